//! A fake Braze REST server on loopback, so the daemon's tests and its `demo` command drive
//! the real HTTP client against Braze's documented rules rather than against the daemon's own
//! assumptions. It shares no code with the daemon. Each rule names the Braze documentation
//! page it follows (paths under braze.com/docs/).
//!
//! **`POST /users/track`** (api/endpoints/user_data/post_user_track), checked in Braze's order:
//! the `Authorization: Bearer` key (401) and its `users.track` permission (403 `Access Denied`,
//! [`FakeBraze::set_permissions`]; api/basics, "REST API key permissions"); a body of at most
//! 4 MB, or what [`FakeBraze::set_max_body_bytes`] says (413; api/api_limits, "Payload size
//! limits") that is a JSON object with optional `attributes`/`events`/`purchases` arrays
//! (400); at most 75 objects counted across the three arrays (400 `Max Input Length
//! Exceeded`, nothing applied; api/errors); no object for a poison `external_id` (400,
//! nothing applied: Braze refuses some malformed objects whole, [`FakeBraze::poison_ids`]);
//! then per object: exactly one of `external_id`, `braze_id`, `user_alias` (or an
//! `email`/`phone`), an `external_id` of at most 987 bytes (api/objects_filters/
//! user_attributes_object), events with a `name` and purchases with a `product_id`, a
//! three-letter `currency`, a numeric `price` and a `quantity` of 1 to 100
//! (api/objects_filters/event_object, …/purchase_object), both with an ISO 8601 `time`
//! (`time.rs`) and object `properties`, and an `email` attribute that is an address
//! (`EMAIL_BAD_FORMAT`, the endpoint's documented errors). Failing objects become non-fatal `errors`
//! (`type`, `input_array`, `index`) in a 201 and the rest are applied; if all fail, it is a
//! 400 and nothing is applied (api/errors).
//!
//! **Profiles exist or not** (api/objects_filters/user_attributes_object,
//! `_update_existing_only`): an attributes object without `"_update_existing_only": true`,
//! an event or a purchase creates the profile of its `external_id`; an update-only object for
//! a profile Braze does not have is answered 201 and counted as processed, yet changes
//! nothing. Tests can create a profile ([`FakeBraze::create_profile`]) or change an attribute
//! out of band, as an SDK, another integration or an unsubscribe link would
//! ([`FakeBraze::set_attribute_out_of_band`]). How an attribute applies (strings over 255
//! characters, `add`/`remove`/`inc`, `_merge_objects`, `$add`/`$update`/`$remove`,
//! `subscription_groups` item by item) is in `profiles.rs`.
//!
//! **Rate-limit headers** `X-RateLimit-Limit`, `-Remaining` and `-Reset` (UTC epoch seconds)
//! are on every answer, 429s included (api/api_limits).
//!
//! **`POST /users/export/ids`** (api/endpoints/export/user_data/post_users_identifier): the key
//! (401), the `users.export.ids` permission (403), at most 50 `external_ids` (400, api/errors),
//! `fields_to_export` given (400; mandatory for workspaces onboarded since August 2024), and a
//! limit of its own, 250 requests a minute by default (429 with `Retry-After` past it;
//! api/api_limits). It answers `users` for the profiles it has (their `external_id` and
//! `custom_attributes`, as far as `fields_to_export` asks) and lists the other ids in
//! `invalid_user_ids`.
//!
//! It can be told to fail with a status, rate-limit, or hang ([`Behaviour`]), to reject chosen
//! `external_id`s the way Braze rejects blocklisted users (`BLACKLISTED_EXTERNAL_USER_ID`),
//! and to take a smaller body or object limit. It records every request and every accepted
//! object.
//!
//! Not modelled: update-only mode for identifiers other than `external_id`, future event times
//! (Braze replaces them with the current time), export lookups by anything but
//! `external_ids`, export fields other than `external_id` and `custom_attributes`, and
//! holding `/users/track` to a rate limit.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::State as AxumState;
use axum::http::header::{AUTHORIZATION, CONTENT_LENGTH, RETRY_AFTER};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{routing::post, Json, Router};
use serde::Deserialize;
use serde_json::{json, Map, Value};
use tokio::{net::TcpListener, sync::watch};

mod profiles;
mod time;

use profiles::{apply, merges};

/// Braze's payload limit for every endpoint (the default; see [`FakeBraze::set_max_body_bytes`]).
const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;
/// Read well past the limit so an oversized body gets its 413 instead of a reset connection.
const READ_CAP: usize = 4 * MAX_BODY_BYTES;
const RATE_LIMIT: u64 = 250_000;
/// `/users/export/ids` takes at most this many `external_ids` a call.
const MAX_EXPORT_IDS: usize = 50;
/// `/users/export/ids` requests a minute, by default (see `Shared::arrive`).
const EXPORT_RATE_LIMIT: u64 = 250;
const ARRAYS: [&str; 3] = ["attributes", "events", "purchases"];
const PRIMARY_IDS: [&str; 3] = ["external_id", "braze_id", "user_alias"];

/// What the fake does before its normal checks. Each variant ends by itself at `until` and the
/// fake accepts again, so a test scripts a whole outage with one call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Behaviour {
    #[default]
    Accept,
    /// Every request gets `status` with Braze's `{"message"}` for it.
    FailStatus { status: u16, until: Instant },
    /// 429 with `Retry-After` and `X-Ratelimit-Retry-After` in whole seconds, rounded up.
    RateLimited {
        retry_after: Duration,
        until: Instant,
    },
    /// Sleep `delay`, then answer normally. The request is processed even if the client gave
    /// up meanwhile, as a server holding the bytes would: that is what makes a timeout ambiguous.
    /// What it applies still counts in arrival order ([`FakeBraze::attribute_value`]), so a hung
    /// request never lands on top of one that arrived after it.
    Hang { delay: Duration, until: Instant },
}

/// One request to `/users/track`, rejected ones included.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestLog {
    /// Arrival, before any `Hang` delay, so tests can measure a client's backoff.
    pub at: Instant,
    pub status: u16,
    /// Objects across the three arrays, counted even when the request was refused.
    pub objects: usize,
    /// The delay sent with a 429, as the client saw it (whole seconds).
    pub retry_after: Option<Duration>,
    pub body_bytes: usize,
}

/// One request to `/users/export/ids`, rejected ones included.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportLog {
    /// Arrival, before any `Hang` delay.
    pub at: Instant,
    pub status: u16,
    /// The body as sent (`Null` if it was not JSON).
    pub body: Value,
}

/// Handle to a running fake. Clones share one server, which stops on [`FakeBraze::stop`] or
/// when the last clone is dropped.
#[derive(Clone)]
pub struct FakeBraze {
    shared: Arc<Shared>,
    addr: SocketAddr,
    /// Only handles own the sender, so dropping the last one closes the channel, which the
    /// server task takes as its stop signal.
    stop: Arc<watch::Sender<bool>>,
}

struct Shared {
    api_key: String,
    /// A std mutex because it is never held across an `.await`: every critical section is a
    /// few vector operations, and the `Hang` sleep runs with it released.
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    behaviour: Behaviour,
    /// The key's `users.track` permission; without it `/users/track` answers 403.
    may_track: bool,
    /// The key's `users.export.ids` permission; without it `/users/export/ids` answers 403.
    may_export_ids: bool,
    max_objects: usize,
    /// Bodies over this many bytes get a 413.
    max_body_bytes: usize,
    rejected_ids: HashSet<String>,
    /// Any one of these in a request makes the whole request a 400.
    poison_ids: HashSet<String>,
    /// (minute since the epoch, requests in it), for the rate-limit headers.
    window: (u64, u64),
    /// The same for `/users/export/ids`, which has a limit of its own.
    export_window: (u64, u64),
    export_limit: u64,
    /// Arrival numbers keep the logs in arrival order when a hung request finishes last.
    next_seq: u64,
    requests: Vec<(u64, RequestLog)>,
    /// (arrival, array name, object) for every accepted object.
    accepted: Vec<(u64, &'static str, Value)>,
    /// The `external_id`s of every accepted object: the profiles Braze holds, which
    /// update-only objects may update and `/users/export/ids` finds.
    known_ids: HashSet<String>,
    /// Every request to `/users/export/ids`, with its arrival number.
    exports: Vec<(u64, ExportLog)>,
    /// Attribute changes made out of band ([`FakeBraze::set_attribute_out_of_band`]), as
    /// attributes objects with their arrival number.
    out_of_band: Vec<(u64, Value)>,
}

impl State {
    /// Every attributes object that applies to a profile, clients' and out-of-band ones, in
    /// arrival order (within one request, in the order sent: the sort is stable).
    fn attribute_writes(&self) -> Vec<&Value> {
        let accepted = self
            .accepted
            .iter()
            .filter(|(_, array, _)| *array == "attributes");
        let mut writes: Vec<(u64, &Value)> = accepted
            .map(|(seq, _, object)| (*seq, object))
            .chain(self.out_of_band.iter().map(|(seq, object)| (*seq, object)))
            .collect();
        writes.sort_by_key(|(seq, _)| *seq);
        writes.into_iter().map(|(_, object)| object).collect()
    }
}

/// What [`decide`] chose: the answer and the objects to record as accepted.
struct Reply {
    status: StatusCode,
    body: Value,
    retry_after: Option<Duration>,
    accepted: Vec<(&'static str, Value)>,
}

impl Reply {
    fn fatal(status: StatusCode, message: &str) -> Reply {
        let (body, accepted) = (json!({ "message": message }), Vec::new());
        Reply {
            status,
            body,
            retry_after: None,
            accepted,
        }
    }
}

impl FakeBraze {
    /// Binds 127.0.0.1:0 and serves in a spawned tokio task until dropped or stopped.
    /// Fails if the port cannot be bound; panics outside a Tokio runtime.
    pub async fn start(api_key: &str) -> std::io::Result<FakeBraze> {
        FakeBraze::start_on(TcpListener::bind("127.0.0.1:0").await?, api_key).await
    }

    /// Serves on a listener the caller bound (a fixed port for `demo`, say).
    /// Fails if the listener has no local address; panics outside a Tokio runtime.
    pub async fn start_on(listener: TcpListener, api_key: &str) -> std::io::Result<FakeBraze> {
        let addr = listener.local_addr()?;
        let state = Mutex::new(State {
            may_track: true,
            may_export_ids: true,
            max_objects: 75,
            max_body_bytes: MAX_BODY_BYTES,
            export_limit: EXPORT_RATE_LIMIT,
            ..State::default()
        });
        let shared = Arc::new(Shared {
            api_key: api_key.to_owned(),
            state,
        });
        let app = Router::new()
            .route("/users/track", post(track).fallback(not_found))
            .route("/users/export/ids", post(export_ids).fallback(not_found))
            .fallback(not_found)
            .with_state(shared.clone());
        let (stop, mut stopped) = watch::channel(false);
        tokio::spawn(async move {
            // An Err (every handle dropped) stops the server as well.
            let signal = async move { drop(stopped.wait_for(|stop| *stop).await) };
            let served = axum::serve(listener, app).with_graceful_shutdown(signal);
            if let Err(error) = served.await {
                tracing::warn!(%error, %addr, "fake Braze stopped serving");
            }
        });
        Ok(FakeBraze {
            shared,
            addr,
            stop: Arc::new(stop),
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set_behaviour(&self, b: Behaviour) {
        self.shared.lock().behaviour = b;
    }

    /// The API key's permissions, both granted at start. A missing one makes its endpoint
    /// answer 403 `{"message":"Access Denied"}` to the right key, as Braze does.
    pub fn set_permissions(&self, track: bool, export_ids: bool) {
        let mut state = self.shared.lock();
        (state.may_track, state.may_export_ids) = (track, export_ids);
    }

    /// Total across attributes, events and purchases; Braze's current default is 75.
    pub fn set_max_objects(&self, n: usize) {
        self.shared.lock().max_objects = n;
    }

    /// Objects with these `external_id`s get a `BLACKLISTED_EXTERNAL_USER_ID` error: Braze
    /// refusing one record for reasons of its own while it accepts the rest of the request.
    pub fn reject_ids(&self, ids: impl IntoIterator<Item = String>) {
        self.shared.lock().rejected_ids.extend(ids);
    }

    /// Requests carrying an object with one of these `external_id`s are refused whole: a 400
    /// with Braze's `{"message"}` and nothing applied, not even the other objects. Braze does
    /// this for some malformed objects instead of listing them in `errors`; the client cannot
    /// tell which object was at fault and has to bisect the batch to find it.
    pub fn poison_ids(&self, ids: impl IntoIterator<Item = String>) {
        self.shared.lock().poison_ids.extend(ids);
    }

    /// `/users/export/ids` requests allowed a minute (250 at start); past them, a 429 with
    /// `Retry-After` until the next minute.
    pub fn set_export_rate_limit(&self, per_minute: u64) {
        self.shared.lock().export_limit = per_minute;
    }

    /// Bodies over `n` bytes get a 413 (Braze's limit, 4 MiB, is the default). A small limit
    /// lets a test reach the 413 with a few kilobytes instead of a 4 MiB batch.
    pub fn set_max_body_bytes(&self, n: usize) {
        self.shared.lock().max_body_bytes = n;
    }

    /// Every accepted event with the arrival time of the request that carried it (before any
    /// `Hang` delay), in arrival order: what a test needs to measure how long an event took
    /// from ingest to Braze.
    pub fn events_with_arrival(&self) -> Vec<(Instant, Value)> {
        let state = self.shared.lock();
        let arrivals: HashMap<u64, Instant> = state
            .requests
            .iter()
            .map(|(seq, log)| (*seq, log.at))
            .collect();
        let mut events: Vec<(u64, Instant, Value)> = state
            .accepted
            .iter()
            .filter(|(_, array, _)| *array == "events")
            // Accepted objects are recorded under the same lock as their request, so the
            // arrival is always there.
            .filter_map(|(seq, _, object)| Some((*seq, *arrivals.get(seq)?, object.clone())))
            .collect();
        drop(state);
        // A stable sort: one request's events keep the order they were sent in.
        events.sort_by_key(|(seq, _, _)| *seq);
        events.into_iter().map(|(_, at, e)| (at, e)).collect()
    }

    /// Every request to `/users/track` in arrival order. A hung request shows up only once
    /// answered, even if its client has given up.
    pub fn requests(&self) -> Vec<RequestLog> {
        let mut requests = self.shared.lock().requests.clone();
        requests.sort_by_key(|(seq, _)| *seq);
        requests.into_iter().map(|(_, log)| log).collect()
    }

    /// Every request to `/users/export/ids` in arrival order.
    pub fn export_requests(&self) -> Vec<ExportLog> {
        let mut exports = self.shared.lock().exports.clone();
        exports.sort_by_key(|(seq, _)| *seq);
        exports.into_iter().map(|(_, log)| log).collect()
    }

    /// Every accepted object with the number of the request that carried it (requests are
    /// numbered as they arrive), in arrival order: what a test needs to see which of two
    /// objects Braze got first, across arrays. Within one request Braze applies attributes,
    /// then events, then purchases.
    pub fn arrivals(&self) -> Vec<(u64, &'static str, Value)> {
        let mut accepted = self.shared.lock().accepted.clone();
        accepted.sort_by_key(|(seq, _, _)| *seq);
        accepted
    }

    pub fn events(&self) -> Vec<Value> {
        self.accepted("events")
    }

    pub fn attributes(&self) -> Vec<Value> {
        self.accepted("attributes")
    }

    pub fn purchases(&self) -> Vec<Value> {
        self.accepted("purchases")
    }

    /// The value Braze holds now for a user's custom attribute, applying accepted attribute
    /// objects in arrival order; `None` if never set or last set to null. `user` is
    /// "external_id:<id>" or "braze_id:<id>" (or "email:<e>", "phone:<p>",
    /// "user_alias:<label>:<name>").
    pub fn attribute_value(&self, user: &str, attribute: &str) -> Option<Value> {
        if PRIMARY_IDS.contains(&attribute) || attribute.starts_with('_') {
            return None;
        }
        let state = self.shared.lock();
        // Under the lock, without copying objects: tests call this in polling loops.
        state
            .attribute_writes()
            .into_iter()
            .filter(|object| user_key(object).as_deref() == Some(user))
            .filter_map(|object| Some((object.get(attribute)?, merges(object))))
            .fold(None, |held, (v, merge)| apply(attribute, held, v, merge))
    }

    /// Every custom attribute Braze holds now, as (user, attribute) -> value, where user is
    /// written as for [`FakeBraze::attribute_value`]. Computed in one pass, for bulk checks.
    pub fn attribute_state(&self) -> HashMap<(String, String), Value> {
        let state = self.shared.lock();
        let mut held: HashMap<(String, String), Value> = HashMap::new();
        for object in state.attribute_writes() {
            let Some(user) = user_key(object) else {
                continue;
            };
            let merge = merges(object);
            let Some(fields) = object.as_object() else {
                continue;
            };
            for (k, v) in fields {
                if PRIMARY_IDS.contains(&k.as_str()) || k.starts_with('_') {
                    continue;
                }
                let key = (user.clone(), k.clone());
                match apply(k, held.remove(&key), v, merge) {
                    Some(now) => held.insert(key, now),
                    None => None,
                };
            }
        }
        held
    }

    /// Creates the profile of `external_id` with no attributes, as a user signing up through
    /// an SDK would: update-only objects for it apply from now on.
    pub fn create_profile(&self, external_id: &str) {
        self.shared.lock().known_ids.insert(external_id.to_owned());
    }

    /// Sets a custom attribute of `external_id` out of band, as an SDK, another integration
    /// or an unsubscribe link would (`null` removes it); creates the profile if needed. Not
    /// listed by [`FakeBraze::attributes`], which lists what clients sent.
    pub fn set_attribute_out_of_band(&self, external_id: &str, attribute: &str, value: Value) {
        let mut state = self.shared.lock();
        state.next_seq += 1;
        let seq = state.next_seq;
        state.known_ids.insert(external_id.to_owned());
        let object = json!({"external_id": external_id, attribute: value});
        state.out_of_band.push((seq, object));
    }

    /// Stops accepting connections; requests in flight are still answered.
    pub fn stop(&self) {
        self.stop.send_replace(true);
    }

    fn accepted(&self, array: &str) -> Vec<Value> {
        let mut accepted = self.shared.lock().accepted.clone();
        accepted.retain(|(_, a, _)| *a == array);
        // A stable sort: one request's objects keep the order they were sent in.
        accepted.sort_by_key(|(seq, _, _)| *seq);
        accepted.into_iter().map(|(_, _, object)| object).collect()
    }
}

impl Shared {
    /// Panics only if the lock is poisoned, i.e. a thread panicked inside one of these short
    /// critical sections: a bug in this file that should fail the test loudly.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("fake Braze state lock poisoned")
    }

    /// Numbers an arriving request and counts it in its endpoint's minute window; returns the
    /// number, the rate-limit headers for its answer, and whether the request is over the
    /// endpoint's limit. Braze sends `X-RateLimit-Limit`, `-Remaining` and `-Reset` (UTC
    /// epoch seconds) on every answer (braze.com/docs/api/api_limits, "Rate limit headers").
    /// `/users/track` is not held to its limit here (its burst limit is per contract);
    /// `/users/export/ids` is, at 250 a minute by default: the limit of workspaces onboarded
    /// since August 2024 (same page, "Rate limits by request type").
    fn arrive(&self, export: bool) -> (u64, HeaderMap, bool) {
        let epoch = SystemTime::now().duration_since(UNIX_EPOCH);
        // A clock before 1970 is not worth failing a test over.
        let epoch = epoch.unwrap_or_default();
        let minute = epoch.as_secs() / 60;
        let mut state = self.lock();
        state.next_seq += 1;
        let limit = if export {
            state.export_limit
        } else {
            RATE_LIMIT
        };
        let window = if export {
            &mut state.export_window
        } else {
            &mut state.window
        };
        if window.0 != minute {
            *window = (minute, 0);
        }
        window.1 += 1;
        let used = window.1;
        let remaining = limit.saturating_sub(used);
        let headers = [
            ("x-ratelimit-limit", limit),
            ("x-ratelimit-remaining", remaining),
            ("x-ratelimit-reset", (minute + 1) * 60),
        ];
        let headers =
            headers.map(|(name, v)| (HeaderName::from_static(name), HeaderValue::from(v)));
        let over = export && used > limit;
        (state.next_seq, headers.into_iter().collect(), over)
    }
}

async fn not_found(AxumState(shared): AxumState<Arc<Shared>>) -> Response {
    let (_, headers, _) = shared.arrive(false);
    let body = Json(json!({"message": "Not Found"}));
    (StatusCode::NOT_FOUND, headers, body).into_response()
}

async fn track(
    AxumState(shared): AxumState<Arc<Shared>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let at = Instant::now();
    let (seq, rate_headers, _) = shared.arrive(false);
    let body = axum::body::to_bytes(body, READ_CAP).await.ok();
    // Spawned so that a client timing out (dropping the connection) cannot cancel processing.
    let task = tokio::spawn(answer(shared, headers, body, seq, at));
    // A JoinError means `answer` panicked: a bug here, reported the way Braze reports its own.
    let reply = task.await.unwrap_or_else(|_| {
        Reply::fatal(StatusCode::INTERNAL_SERVER_ERROR, "Internal Server Error")
    });
    let mut headers = rate_headers;
    if let Some(secs) = reply.retry_after.map(|d| HeaderValue::from(d.as_secs())) {
        headers.insert(RETRY_AFTER, secs.clone());
        headers.insert(HeaderName::from_static("x-ratelimit-retry-after"), secs);
    }
    (reply.status, headers, Json(reply.body)).into_response()
}

/// Decides, then records the request and what it applied under one lock.
async fn answer(
    shared: Arc<Shared>,
    headers: HeaderMap,
    body: Option<Bytes>,
    seq: u64,
    at: Instant,
) -> Reply {
    let content_length = || headers.get(CONTENT_LENGTH)?.to_str().ok()?.parse().ok();
    let body_len = body.as_ref().map(Bytes::len);
    let body_bytes = body_len.or_else(content_length).unwrap_or(0);
    let parsed = body.and_then(|b| serde_json::from_slice::<Value>(&b).ok());
    let count = |a: &&str| parsed.as_ref()?.get(*a)?.as_array().map(Vec::len);
    let objects = ARRAYS.iter().filter_map(count).sum();
    let reply = decide(&shared, &headers, body_bytes, parsed, at).await;
    let (status, retry_after) = (reply.status.as_u16(), reply.retry_after);
    let log = RequestLog {
        at,
        status,
        objects,
        retry_after,
        body_bytes,
    };
    let mut state = shared.lock();
    state.requests.push((seq, log));
    // Decided here, under the lock that records, rather than in `decide`: a profile created by
    // a request that finished meanwhile counts, and the set of known ids is never copied.
    for (array, object) in &reply.accepted {
        let external_id = object.get("external_id").and_then(Value::as_str);
        let update_only = object.get("_update_existing_only") == Some(&Value::Bool(true));
        match external_id {
            Some(id) if update_only && !state.known_ids.contains(id) => continue,
            Some(id) if !state.known_ids.contains(id) => {
                state.known_ids.insert(id.to_owned());
            }
            _ => {}
        }
        state.accepted.push((seq, array, object.clone()));
    }
    drop(state);
    reply
}

/// The behaviour in force for a request that arrived `at`; an expired one reverts to
/// `Accept` for good.
fn current_behaviour(state: &mut State, at: Instant) -> Behaviour {
    let until = match state.behaviour {
        Behaviour::Accept => at,
        Behaviour::FailStatus { until, .. }
        | Behaviour::RateLimited { until, .. }
        | Behaviour::Hang { until, .. } => until,
    };
    if at >= until {
        state.behaviour = Behaviour::Accept;
    }
    state.behaviour
}

/// Plays a scripted behaviour before the normal checks, on every endpoint: the answer it
/// forces, or `None` to go on (after a `Hang`'s sleep).
async fn play(behaviour: Behaviour) -> Option<Reply> {
    match behaviour {
        Behaviour::Accept => {}
        Behaviour::FailStatus { status, .. } => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            let message = match status.as_u16() {
                401 => "Invalid API Key",
                403 => "Access Denied",
                404 => "Not Found",
                429 => "API rate limit reached",
                503 => "Service Unavailable",
                500..=599 => "Internal Server Error",
                _ => "Bad Request",
            };
            return Some(Reply::fatal(status, message));
        }
        Behaviour::RateLimited { retry_after, .. } => return Some(rate_limited(retry_after)),
        Behaviour::Hang { delay, .. } => tokio::time::sleep(delay).await,
    }
    None
}

/// A 429 asking the client to wait `retry_after`, rounded up to whole seconds.
fn rate_limited(retry_after: Duration) -> Reply {
    let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
    let reply = Reply::fatal(StatusCode::TOO_MANY_REQUESTS, "API rate limit reached");
    Reply {
        retry_after: Some(Duration::from_secs(secs)),
        ..reply
    }
}

/// Time left in the current minute window.
fn seconds_to_next_minute() -> Duration {
    let epoch = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    Duration::from_secs(60 - epoch.as_secs() % 60)
}

/// Whether the request carries the fake's key as `Authorization: Bearer`.
fn authorised(shared: &Shared, headers: &HeaderMap) -> bool {
    let key = headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok());
    key.and_then(|k| k.strip_prefix("Bearer ")) == Some(shared.api_key.as_str())
}

/// `POST /users/export/ids`: see the module doc.
async fn export_ids(
    AxumState(shared): AxumState<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let at = Instant::now();
    let (seq, rate_headers, over) = shared.arrive(true);
    let parsed = serde_json::from_slice::<Value>(&body).ok();
    let reply = match over {
        true => rate_limited(seconds_to_next_minute()),
        false => decide_export(&shared, &headers, parsed.as_ref(), at).await,
    };
    let log = ExportLog {
        at,
        status: reply.status.as_u16(),
        body: parsed.unwrap_or(Value::Null),
    };
    shared.lock().exports.push((seq, log));
    let mut headers = rate_headers;
    if let Some(secs) = reply.retry_after.map(|d| HeaderValue::from(d.as_secs())) {
        headers.insert(RETRY_AFTER, secs.clone());
        headers.insert(HeaderName::from_static("x-ratelimit-retry-after"), secs);
    }
    (reply.status, headers, Json(reply.body)).into_response()
}

/// The part of an export body the fake reads.
#[derive(Deserialize)]
struct ExportRequest {
    #[serde(default)]
    external_ids: Vec<String>,
    fields_to_export: Option<Vec<String>>,
}

async fn decide_export(
    shared: &Shared,
    headers: &HeaderMap,
    parsed: Option<&Value>,
    at: Instant,
) -> Reply {
    let behaviour = current_behaviour(&mut shared.lock(), at);
    if let Some(reply) = play(behaviour).await {
        return reply;
    }
    if !authorised(shared, headers) {
        return Reply::fatal(StatusCode::UNAUTHORIZED, "Invalid API Key");
    }
    if !shared.lock().may_export_ids {
        return Reply::fatal(StatusCode::FORBIDDEN, "Access Denied");
    }
    let request = parsed.and_then(|v| ExportRequest::deserialize(v).ok());
    let Some(request) = request else {
        return Reply::fatal(StatusCode::BAD_REQUEST, "Body must be a JSON object");
    };
    // "The max number of external_ids and aliases per request was exceeded": more than 50
    // (braze.com/docs/api/errors, 400 Bad Request).
    if request.external_ids.len() > MAX_EXPORT_IDS {
        let message = "The max number of external_ids and aliases per request was exceeded";
        return Reply::fatal(StatusCode::BAD_REQUEST, message);
    }
    let Some(fields) = request.fields_to_export.filter(|f| !f.is_empty()) else {
        let message = "'fields_to_export' is required";
        return Reply::fatal(StatusCode::BAD_REQUEST, message);
    };
    let wants = |field: &str| fields.iter().any(|f| f == field);
    let state = shared.lock();
    let (mut users, mut invalid) = (Vec::new(), Vec::new());
    for id in request.external_ids {
        if !state.known_ids.contains(&id) {
            invalid.push(id);
            continue;
        }
        let mut user = Map::new();
        if wants("external_id") {
            user.insert("external_id".into(), id.clone().into());
        }
        if wants("custom_attributes") {
            user.insert(
                "custom_attributes".into(),
                custom_attributes(&state, &id).into(),
            );
        }
        users.push(Value::Object(user));
    }
    drop(state);
    let mut body = json!({"message": "success", "users": users});
    if !invalid.is_empty() {
        body["invalid_user_ids"] = invalid.into();
    }
    Reply {
        status: StatusCode::CREATED,
        body,
        retry_after: None,
        accepted: Vec::new(),
    }
}

/// The custom attributes Braze holds for `external_id`, applying accepted attribute objects
/// in arrival order (within one request, in the order sent).
fn custom_attributes(state: &State, external_id: &str) -> Map<String, Value> {
    let mut held = Map::new();
    let mine =
        |object: &&Value| object.get("external_id").and_then(Value::as_str) == Some(external_id);
    for object in state.attribute_writes().into_iter().filter(mine) {
        let merge = merges(object);
        for (k, v) in object.as_object().into_iter().flatten() {
            if PRIMARY_IDS.contains(&k.as_str()) || k.starts_with('_') {
                continue;
            }
            match apply(k, held.remove(k), v, merge) {
                Some(now) => held.insert(k.clone(), now),
                None => None,
            };
        }
    }
    held
}

/// Braze's checks in Braze's order; see the module doc.
async fn decide(
    shared: &Shared,
    headers: &HeaderMap,
    body_bytes: usize,
    parsed: Option<Value>,
    at: Instant,
) -> Reply {
    let (behaviour, may_track, max_objects, max_body_bytes, rejected_ids, poison_ids) = {
        let mut state = shared.lock();
        let behaviour = current_behaviour(&mut state, at);
        let rejected_ids = state.rejected_ids.clone();
        let poison_ids = state.poison_ids.clone();
        let (max_objects, max_body_bytes) = (state.max_objects, state.max_body_bytes);
        (
            behaviour,
            state.may_track,
            max_objects,
            max_body_bytes,
            rejected_ids,
            poison_ids,
        )
    };
    if let Some(reply) = play(behaviour).await {
        return reply;
    }
    if !authorised(shared, headers) {
        return Reply::fatal(StatusCode::UNAUTHORIZED, "Invalid API Key");
    }
    if !may_track {
        return Reply::fatal(StatusCode::FORBIDDEN, "Access Denied");
    }
    if body_bytes > max_body_bytes {
        return Reply::fatal(StatusCode::PAYLOAD_TOO_LARGE, "Request Entity Too Large");
    }
    let Some(Value::Object(body)) = parsed else {
        return Reply::fatal(StatusCode::BAD_REQUEST, "Body must be a JSON object");
    };
    let mut arrays = Vec::new();
    for array in ARRAYS {
        match body.get(array) {
            None | Some(Value::Null) => {}
            Some(Value::Array(items)) => arrays.push((array, items)),
            Some(_) => return Reply::fatal(StatusCode::BAD_REQUEST, "Bad Request"),
        }
    }
    if arrays.iter().map(|(_, items)| items.len()).sum::<usize>() > max_objects {
        return Reply::fatal(StatusCode::BAD_REQUEST, "Max Input Length Exceeded");
    }
    let poison = |object: &Value| {
        let id = object.get("external_id")?.as_str()?;
        poison_ids.contains(id).then(|| id.to_owned())
    };
    let mut objects = arrays.iter().flat_map(|(_, items)| items.iter());
    if let Some(id) = objects.find_map(poison) {
        let message =
            format!("Invalid request: the object for external_id '{id}' cannot be processed");
        return Reply::fatal(StatusCode::BAD_REQUEST, &message);
    }
    let (mut errors, mut accepted, mut success) = (Vec::new(), Vec::new(), Map::new());
    success.insert("message".into(), "success".into());
    for (array, items) in arrays {
        let before = accepted.len();
        for (index, object) in items.iter().enumerate() {
            match check(array, object, &rejected_ids) {
                Ok(()) => accepted.push((array, object.clone())),
                Err(kind) => {
                    errors.push(json!({"type": kind, "input_array": array, "index": index}))
                }
            }
        }
        let processed = accepted.len() - before;
        success.insert(format!("{array}_processed"), processed.into());
    }
    let mut reply = Reply {
        status: StatusCode::CREATED,
        body: success.into(),
        retry_after: None,
        accepted,
    };
    if reply.accepted.is_empty() {
        let message =
            "Valid data must be provided in the 'attributes', 'events', or 'purchases' fields.";
        reply = Reply::fatal(StatusCode::BAD_REQUEST, message);
    }
    if !errors.is_empty() {
        reply.body["errors"] = errors.into();
    }
    reply
}

/// One object's checks; the error is Braze's `type` text for it.
fn check(array: &str, object: &Value, rejected_ids: &HashSet<String>) -> Result<(), &'static str> {
    let Some(object) = object.as_object() else {
        return Err("object is not valid");
    };
    let given = |key: &str| object.get(key).is_some_and(|v| !v.is_null());
    match PRIMARY_IDS.iter().filter(|k| given(k)).count() {
        0 if !given("email") && !given("phone") => {
            return Err("'external_id', 'braze_id', 'user_alias', 'email' or 'phone' is required")
        }
        0 | 1 => {}
        _ => return Err("only one of 'external_id', 'braze_id' or 'user_alias' may be given"),
    }
    if let Some(id) = object.get("external_id").filter(|v| !v.is_null()) {
        let id = id.as_str().ok_or("'external_id' is not valid")?;
        if id.len() > 987 {
            return Err("EXTERNAL_USER_ID_TOO_LARGE");
        }
        if rejected_ids.contains(id) {
            return Err("BLACKLISTED_EXTERNAL_USER_ID");
        }
    }
    // `EMAIL_BAD_FORMAT` (api/endpoints/user_data/post_user_track, "Endpoint-specific
    // errors"): the `email` attribute must be an address.
    if array == "attributes" {
        if let Some(email) = object.get("email").filter(|v| !v.is_null()) {
            if !email.as_str().is_some_and(is_email) {
                return Err("EMAIL_BAD_FORMAT");
            }
        }
    }
    if array == "events" {
        let name = object.get("name").and_then(Value::as_str);
        if name.is_none_or(str::is_empty) {
            return Err("'name' is required");
        }
    }
    if array == "purchases" {
        let product = object.get("product_id").and_then(Value::as_str);
        if product.is_none_or(str::is_empty) {
            return Err("'product_id' is required");
        }
        let currency = object.get("currency").and_then(Value::as_str);
        if currency.is_none_or(|c| c.len() != 3) {
            return Err("'currency' is not valid");
        }
        if !object.get("price").is_some_and(Value::is_number) {
            return Err("'price' is not valid");
        }
        let quantity = object.get("quantity").filter(|q| !q.is_null());
        if quantity.is_some_and(|q| q.as_u64().is_none_or(|q| !(1..=100).contains(&q))) {
            return Err("'quantity' is not valid");
        }
    }
    if array == "events" || array == "purchases" {
        let time = object.get("time").and_then(Value::as_str);
        if !time.is_some_and(time::is_event_time) {
            return Err("'time' is not valid");
        }
        if object.get("properties").is_some_and(|p| !p.is_object()) {
            return Err("'properties' is not valid");
        }
    }
    Ok(())
}

/// An address as far as the fake checks one: one `@`, something before it, a dotted domain
/// after it, no spaces.
fn is_email(s: &str) -> bool {
    let Some((local, domain)) = s.split_once('@') else {
        return false;
    };
    !local.is_empty()
        && !domain.contains('@')
        && domain.split('.').count() >= 2
        && domain.split('.').all(|part| !part.is_empty())
        && !s.contains(char::is_whitespace)
}

/// Which profile an object addresses, in the form [`FakeBraze::attribute_value`] takes.
fn user_key(object: &Value) -> Option<String> {
    if let Some(alias) = object.get("user_alias").filter(|v| !v.is_null()) {
        let part = |key: &str| alias.get(key).and_then(Value::as_str).unwrap_or_default();
        let (label, name) = (part("alias_label"), part("alias_name"));
        return Some(format!("user_alias:{label}:{name}"));
    }
    let mut ids = ["external_id", "braze_id", "email", "phone"].into_iter();
    ids.find_map(|key| Some(format!("{key}:{}", object.get(key)?.as_str()?)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "test-key";
    const LATER: Duration = Duration::from_secs(60);
    const TIME: &str = "2024-05-01T10:00:00Z";

    fn client(timeout: Duration) -> reqwest::Client {
        // reqwest is built without a default crypto provider; an Err means one is installed.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let builder = reqwest::Client::builder().no_proxy().timeout(timeout);
        builder.build().expect("reqwest client builds")
    }

    async fn fake() -> FakeBraze {
        FakeBraze::start(KEY).await.expect("fake Braze starts")
    }

    async fn send(fake: &FakeBraze, key: &str, body: &Value) -> (u16, HeaderMap, Value) {
        let url = format!("{}/users/track", fake.url());
        let request = client(Duration::from_secs(5)).post(url).bearer_auth(key);
        let response = request.json(body).send().await.expect("fake answers");
        let (status, headers) = (response.status().as_u16(), response.headers().clone());
        (status, headers, response.json().await.expect("JSON answer"))
    }

    async fn export(fake: &FakeBraze, key: &str, body: &Value) -> (u16, Value) {
        let url = format!("{}/users/export/ids", fake.url());
        let request = client(Duration::from_secs(5)).post(url).bearer_auth(key);
        let response = request.json(body).send().await.expect("fake answers");
        let status = response.status().as_u16();
        (status, response.json().await.expect("JSON answer"))
    }

    fn lookup(ids: &[&str]) -> Value {
        json!({"external_ids": ids, "fields_to_export": ["external_id", "custom_attributes"]})
    }

    fn message(text: &str) -> Value {
        json!({ "message": text })
    }

    fn tier(id: &str, tier: &str) -> Value {
        let tier = Some(tier).filter(|t| !t.is_empty()); // "" sends null, to unset
        json!({"external_id": id, "tier": tier, "_update_existing_only": false})
    }

    fn tier_of(fake: &FakeBraze, user: &str) -> Option<Value> {
        fake.attribute_value(user, "tier")
    }

    fn event(id: &str, time: &str) -> Value {
        json!({"external_id": id, "name": "bought", "time": time, "properties": {"sku": 7}})
    }

    #[tokio::test]
    async fn accepted_objects_are_recorded_and_attributes_apply_in_arrival_order() {
        let fake = fake().await;
        let bought = event("u1", TIME);
        let body = json!({"attributes": [tier("u1", "gold")], "events": [bought]});
        let (status, headers, answer) = send(&fake, KEY, &body).await;
        let processed =
            json!({"message": "success", "attributes_processed": 1, "events_processed": 1});
        assert_eq!((status, answer), (201, processed));
        assert_eq!(headers["x-ratelimit-limit"], "250000");
        assert!(headers.contains_key("x-ratelimit-remaining"));
        assert!(headers.contains_key("x-ratelimit-reset"));
        assert_eq!(tier_of(&fake, "external_id:u1"), Some("gold".into()));
        let flag = fake.attribute_value("external_id:u1", "_update_existing_only");
        assert_eq!((flag, fake.events()), (None, vec![bought]));

        let tin = json!({"braze_id": "b1", "tier": "tin"});
        let unset = json!({"attributes": [tier("u1", ""), tin]});
        assert_eq!(send(&fake, KEY, &unset).await.0, 201);
        assert_eq!(tier_of(&fake, "external_id:u1"), None);
        assert_eq!(tier_of(&fake, "braze_id:b1"), Some("tin".into()));
        assert_eq!((fake.attributes().len(), fake.requests().len()), (3, 2));
    }

    #[tokio::test]
    async fn a_wrong_api_key_is_a_401_that_is_logged_and_applies_nothing() {
        let fake = fake().await;
        let body = json!({"attributes": [tier("u1", "gold")]});
        let (status, _, answer) = send(&fake, "\"test-key\"", &body).await;
        assert_eq!((status, answer), (401, message("Invalid API Key")));
        assert_eq!(fake.requests()[0].status, 401);
        assert!(fake.attributes().is_empty());
    }

    #[tokio::test]
    async fn more_than_75_objects_is_a_400_and_applies_nothing() {
        let fake = fake().await;
        let attributes: Vec<_> = (0..70).map(|i| tier(&format!("u{i}"), "gold")).collect();
        let body = json!({"attributes": attributes, "events": vec![event("u1", TIME); 6]});
        let (status, _, answer) = send(&fake, KEY, &body).await;
        assert_eq!(
            (status, answer),
            (400, message("Max Input Length Exceeded"))
        );
        assert_eq!(fake.requests()[0].objects, 76);
        assert!(fake.attributes().is_empty() && fake.events().is_empty());
    }

    #[tokio::test]
    async fn bad_objects_are_non_fatal_errors_and_the_others_are_applied() {
        let fake = fake().await;
        fake.reject_ids(["blocked".to_string()]);
        let two_ids = json!({"external_id": "u2", "braze_id": "b2", "tier": "x"});
        let attributes = [tier("u1", "a"), two_ids, tier("u3", "c")];
        let events = [
            event("u1", "yesterday"),
            event("blocked", TIME),
            event("u4", TIME),
        ];
        let body = json!({"attributes": attributes, "events": events});
        let (status, _, answer) = send(&fake, KEY, &body).await;
        let two = "only one of 'external_id', 'braze_id' or 'user_alias' may be given";
        let errors = json!([
            {"type": two, "input_array": "attributes", "index": 1},
            {"type": "'time' is not valid", "input_array": "events", "index": 0},
            {"type": "BLACKLISTED_EXTERNAL_USER_ID", "input_array": "events", "index": 1},
        ]);
        let counts = (&answer["attributes_processed"], &answer["events_processed"]);
        assert_eq!(
            (status, counts, &answer["errors"]),
            (201, (&2.into(), &1.into()), &errors)
        );
        let [a, _, c] = attributes;
        assert_eq!(
            (fake.attributes(), fake.events()),
            (vec![a, c], vec![events[2].clone()])
        );
    }

    #[tokio::test]
    async fn a_request_whose_objects_all_fail_is_a_400_with_the_errors() {
        let fake = fake().await;
        let body = json!({"events": [{"external_id": "u1", "time": TIME}]});
        let (status, _, answer) = send(&fake, KEY, &body).await;
        assert_eq!(
            (status, &answer["errors"][0]["type"]),
            (400, &"'name' is required".into())
        );
        assert!(fake.events().is_empty());
    }

    #[tokio::test]
    async fn rate_limited_answers_429_with_both_retry_headers_rounded_up() {
        let fake = fake().await;
        let retry_after = Duration::from_millis(1500);
        let until = Instant::now() + LATER;
        fake.set_behaviour(Behaviour::RateLimited { retry_after, until });
        let (status, headers, answer) = send(&fake, KEY, &json!({})).await;
        assert_eq!((status, answer), (429, message("API rate limit reached")));
        assert_eq!(headers["retry-after"], "2");
        assert_eq!(headers["x-ratelimit-retry-after"], "2");
        // Braze sends the rate-limit headers on every answer, 429s included.
        assert_eq!(headers["x-ratelimit-limit"], "250000");
        assert!(headers.contains_key("x-ratelimit-reset"));
        assert_eq!(fake.requests()[0].retry_after, Some(Duration::from_secs(2)));
    }

    #[tokio::test]
    async fn export_takes_at_most_50_ids_and_holds_to_its_own_rate_limit() {
        let fake = fake().await;
        let ids: Vec<String> = (0..51).map(|i| format!("u{i}")).collect();
        let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
        let (status, answer) = export(&fake, KEY, &lookup(&ids)).await;
        let too_many = "The max number of external_ids and aliases per request was exceeded";
        assert_eq!((status, answer), (400, message(too_many)));
        assert_eq!(export(&fake, KEY, &lookup(&ids[..50])).await.0, 201);

        fake.set_export_rate_limit(3);
        let url = format!("{}/users/export/ids", fake.url());
        let mut statuses = Vec::new();
        for _ in 0..3 {
            let request = client(Duration::from_secs(5)).post(&url).bearer_auth(KEY);
            let response = request.json(&lookup(&["u1"])).send().await.unwrap();
            let headers = response.headers().clone();
            statuses.push(response.status().as_u16());
            assert_eq!(headers["x-ratelimit-limit"], "3");
            if response.status() == 429 {
                assert!(headers.contains_key("retry-after"));
            }
        }
        // The two calls above count in the same minute (unless it just turned).
        assert!(
            statuses.contains(&429) || statuses == [201, 201, 201],
            "{statuses:?}"
        );
    }

    #[tokio::test]
    async fn update_only_applies_once_a_profile_exists_and_out_of_band_changes_count() {
        let fake = fake().await;
        let only = json!({"external_id": "u1", "tier": "gold", "_update_existing_only": true});
        let body = json!({"attributes": [only]});
        let (status, _, answer) = send(&fake, KEY, &body).await;
        assert_eq!((status, &answer["attributes_processed"]), (201, &json!(1)));
        assert_eq!(tier_of(&fake, "external_id:u1"), None);
        let (_, found) = export(&fake, KEY, &lookup(&["u1"])).await;
        assert_eq!(found["invalid_user_ids"], json!(["u1"]));

        fake.create_profile("u1");
        assert_eq!(send(&fake, KEY, &body).await.0, 201);
        assert_eq!(tier_of(&fake, "external_id:u1"), Some("gold".into()));

        fake.set_attribute_out_of_band("u1", "tier", json!("tin"));
        assert_eq!(tier_of(&fake, "external_id:u1"), Some("tin".into()));
        let (_, found) = export(&fake, KEY, &lookup(&["u1"])).await;
        assert_eq!(found["users"][0]["custom_attributes"]["tier"], "tin");
        assert_eq!(
            fake.attributes().len(),
            1,
            "out-of-band writes are not client objects"
        );
    }

    #[tokio::test]
    async fn a_string_over_255_characters_is_not_stored_while_its_siblings_are() {
        let fake = fake().await;
        let long = "x".repeat(300);
        let object = json!({"external_id": "u1", "tier": "gold", "bio": "short"});
        assert_eq!(
            send(&fake, KEY, &json!({"attributes": [object]})).await.0,
            201
        );
        let object = json!({"external_id": "u1", "tier": "silver", "bio": long});
        let (status, _, answer) = send(&fake, KEY, &json!({"attributes": [object]})).await;
        assert_eq!((status, answer.get("errors")), (201, None));
        assert_eq!(tier_of(&fake, "external_id:u1"), Some("silver".into()));
        assert_eq!(
            fake.attribute_value("external_id:u1", "bio"),
            Some("short".into())
        );
    }

    #[tokio::test]
    async fn fail_status_expires_by_itself() {
        let fake = fake().await;
        let until = Instant::now() + Duration::from_millis(500);
        fake.set_behaviour(Behaviour::FailStatus { status: 503, until });
        let body = json!({"attributes": [tier("u1", "gold")]});
        let (status, _, answer) = send(&fake, KEY, &body).await;
        assert_eq!((status, answer), (503, message("Service Unavailable")));
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(send(&fake, KEY, &body).await.0, 201);
        let statuses: Vec<_> = fake.requests().iter().map(|r| r.status).collect();
        assert_eq!(statuses, [503, 201]);
    }

    #[tokio::test]
    async fn a_hung_request_is_still_applied_after_the_client_gives_up() {
        let fake = fake().await;
        let delay = Duration::from_millis(300);
        fake.set_behaviour(Behaviour::Hang {
            delay,
            until: Instant::now() + LATER,
        });
        let url = format!("{}/users/track", fake.url());
        let body = json!({"attributes": [tier("u1", "gold")]});
        let request = client(Duration::from_millis(100))
            .post(url)
            .bearer_auth(KEY);
        let error = request
            .json(&body)
            .send()
            .await
            .expect_err("client times out");
        assert!(error.is_timeout());
        tokio::time::sleep(Duration::from_millis(800)).await; // the hang ends at 300 ms
        assert_eq!(fake.requests()[0].status, 201);
        assert_eq!(tier_of(&fake, "external_id:u1"), Some("gold".into()));
    }

    #[tokio::test]
    async fn other_paths_and_methods_are_404_and_not_logged() {
        let fake = fake().await;
        let client = client(Duration::from_secs(5));
        for path in ["/users/track", "/users/export/ids"] {
            let response = client.get(format!("{}{path}", fake.url())).send().await;
            assert_eq!(response.expect("fake answers").status().as_u16(), 404);
        }
        assert!(fake.requests().is_empty());
    }

    #[tokio::test]
    async fn one_poison_id_refuses_the_whole_request_and_applies_nothing() {
        let fake = fake().await;
        fake.poison_ids(["bad".to_string()]);
        let attributes = [tier("u1", "gold"), tier("u2", "tin")];
        let body =
            json!({"attributes": attributes, "events": [event("u3", TIME), event("bad", TIME)]});
        let (status, headers, answer) = send(&fake, KEY, &body).await;
        assert_eq!(status, 400);
        let text = answer["message"].as_str().expect("a message");
        assert!(text.contains("'bad'"), "{text}");
        assert!(
            answer.get("errors").is_none(),
            "a whole-request 400 lists no objects"
        );
        assert!(headers.contains_key("x-ratelimit-remaining"));
        assert!(fake.attributes().is_empty() && fake.events().is_empty());
        let log = &fake.requests()[0];
        assert_eq!((log.status, log.objects), (400, 4));

        // Without the poison the same objects go through.
        let body = json!({"attributes": attributes, "events": [event("u3", TIME)]});
        assert_eq!(send(&fake, KEY, &body).await.0, 201);
        assert_eq!((fake.attributes().len(), fake.events().len()), (2, 1));
    }

    #[tokio::test]
    async fn a_body_over_the_set_limit_is_a_413_and_one_under_it_is_taken() {
        let fake = fake().await;
        let small = json!({"attributes": [tier("u1", "gold")]});
        let limit = serde_json::to_vec(&small).expect("JSON").len();
        fake.set_max_body_bytes(limit);
        assert_eq!(send(&fake, KEY, &small).await.0, 201);
        let big = json!({"attributes": [tier("u1", "platinum")]});
        let (status, _, answer) = send(&fake, KEY, &big).await;
        assert_eq!((status, answer), (413, message("Request Entity Too Large")));
        assert_eq!(tier_of(&fake, "external_id:u1"), Some("gold".into()));
        let sizes: Vec<_> = fake.requests().iter().map(|r| r.body_bytes).collect();
        assert_eq!(sizes, [limit, limit + 4]);
    }

    #[tokio::test]
    async fn accepted_events_carry_the_arrival_of_their_request() {
        let fake = fake().await;
        fake.reject_ids(["blocked".to_string()]);
        let first =
            json!({"events": [event("u1", TIME), event("blocked", TIME), event("u2", TIME)]});
        assert_eq!(send(&fake, KEY, &first).await.0, 201);
        // A request without events takes a place in the arrival order but adds no event.
        let attributes_only = json!({"attributes": [tier("u1", "x")]});
        assert_eq!(send(&fake, KEY, &attributes_only).await.0, 201);
        let second = json!({"events": [event("u3", TIME)]});
        assert_eq!(send(&fake, KEY, &second).await.0, 201);

        let requests = fake.requests();
        let got = fake.events_with_arrival();
        let users: Vec<_> = got.iter().map(|(_, e)| e["external_id"].clone()).collect();
        assert_eq!(users, ["u1", "u2", "u3"]);
        let arrivals: Vec<_> = got.iter().map(|(at, _)| *at).collect();
        assert_eq!(arrivals, [requests[0].at, requests[0].at, requests[2].at]);
        assert!(requests[0].at < requests[2].at);
    }

    #[tokio::test]
    async fn update_only_objects_for_unknown_users_are_processed_but_create_nobody() {
        let fake = fake().await;
        let probe = json!({"external_id": "nobody", "_update_existing_only": true, "x": 1});
        let (status, _, answer) = send(&fake, KEY, &json!({"attributes": [probe]})).await;
        let processed = json!({"message": "success", "attributes_processed": 1});
        assert_eq!((status, answer), (201, processed));
        assert!(fake.attributes().is_empty() && fake.attribute_state().is_empty());
        let (_, answer) = export(&fake, KEY, &lookup(&["nobody"])).await;
        assert_eq!(answer["users"], json!([]));

        // Once the user exists, update-only objects update it.
        assert_eq!(
            send(&fake, KEY, &json!({"attributes": [tier("u1", "gold")]}))
                .await
                .0,
            201
        );
        let update = json!({"external_id": "u1", "_update_existing_only": true, "tier": "tin"});
        assert_eq!(
            send(&fake, KEY, &json!({"attributes": [update]})).await.0,
            201
        );
        assert_eq!(tier_of(&fake, "external_id:u1"), Some("tin".into()));
    }

    #[tokio::test]
    async fn export_ids_finds_known_users_and_lists_the_others_as_invalid() {
        let fake = fake().await;
        let body = json!({"attributes": [tier("u1", "gold")], "events": [event("u2", TIME)]});
        assert_eq!(send(&fake, KEY, &body).await.0, 201);
        let (status, answer) = export(&fake, KEY, &lookup(&["u1", "u2", "u3"])).await;
        let expected = json!({
            "message": "success",
            "users": [
                {"external_id": "u1", "custom_attributes": {"tier": "gold"}},
                {"external_id": "u2", "custom_attributes": {}},
            ],
            "invalid_user_ids": ["u3"],
        });
        assert_eq!((status, answer), (201, expected));
        let only_ids = json!({"external_ids": ["u1"], "fields_to_export": ["external_id"]});
        let (_, answer) = export(&fake, KEY, &only_ids).await;
        assert_eq!(
            answer,
            json!({"message": "success", "users": [{"external_id": "u1"}]})
        );
        let logged: Vec<_> = fake.export_requests().into_iter().map(|l| l.body).collect();
        assert_eq!(logged, [lookup(&["u1", "u2", "u3"]), only_ids]);
        assert_eq!(
            fake.requests().len(),
            1,
            "exports are not /users/track requests"
        );
    }

    #[tokio::test]
    async fn export_ids_without_fields_to_export_is_a_400() {
        let fake = fake().await;
        let (status, answer) = export(&fake, KEY, &json!({"external_ids": ["u1"]})).await;
        assert_eq!(
            (status, answer),
            (400, message("'fields_to_export' is required"))
        );
        let (status, _) = export(&fake, KEY, &json!(["u1"])).await;
        assert_eq!(status, 400);
    }

    #[tokio::test]
    async fn a_missing_permission_is_a_403_on_its_endpoint_only_and_a_wrong_key_is_still_401() {
        let fake = fake().await;
        let body = json!({"attributes": [tier("u1", "gold")]});
        fake.set_permissions(false, true);
        let (status, _, answer) = send(&fake, KEY, &body).await;
        assert_eq!((status, answer), (403, message("Access Denied")));
        assert!(fake.attributes().is_empty());
        assert_eq!(export(&fake, KEY, &lookup(&["u1"])).await.0, 201);
        assert_eq!(send(&fake, "wrong", &body).await.0, 401);

        fake.set_permissions(true, false);
        let (status, answer) = export(&fake, KEY, &lookup(&["u1"])).await;
        assert_eq!((status, answer), (403, message("Access Denied")));
        assert_eq!(export(&fake, "wrong", &lookup(&["u1"])).await.0, 401);
        assert_eq!(send(&fake, KEY, &body).await.0, 201);
        let statuses: Vec<_> = fake.export_requests().iter().map(|l| l.status).collect();
        assert_eq!(statuses, [201, 403, 401]);
    }

    #[tokio::test]
    async fn a_scripted_failure_applies_to_export_ids_too() {
        let fake = fake().await;
        let until = Instant::now() + LATER;
        fake.set_behaviour(Behaviour::FailStatus { status: 404, until });
        let (status, answer) = export(&fake, KEY, &lookup(&["u1"])).await;
        assert_eq!((status, answer), (404, message("Not Found")));
        let (status, _, _) = send(&fake, KEY, &json!({"attributes": [tier("u1", "x")]})).await;
        assert_eq!(status, 404);
    }

    #[tokio::test]
    async fn a_stopped_fake_refuses_connections() {
        let fake = fake().await;
        fake.stop();
        tokio::time::sleep(Duration::from_millis(200)).await; // for the server task to notice
        let url = format!("{}/users/track", fake.url());
        let error = client(Duration::from_secs(5)).post(url).send().await;
        assert!(error.expect_err("nothing listens").is_connect());
    }
}
