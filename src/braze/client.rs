//! The HTTP client for Braze: the only place that knows URLs, headers and status codes.
//!
//! Every answer is turned into a named `TrackOutcome`, so the delivery loop decides on our
//! own types and never sees a `reqwest::Response`. The `check` command's two probes
//! ([`BrazeClient::probe_track`], [`BrazeClient::probe_export_ids`]) answer with a
//! [`ProbeOutcome`] instead: they ask whether the setup works, not what to do with a batch.
//! The client never retries or waits on its own: what to do after an answer is delivery's
//! (`gate.rs`) or the command's.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use reqwest::header::{HeaderMap, AUTHORIZATION, CONTENT_TYPE};
use serde::Deserialize;

use crate::config::{BrazeConfig, Secret};

/// One per-object error from a 2xx answer: Braze refused that object and took the rest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectError {
    pub input_array: String,
    pub index: usize,
    pub reason: String,
}

/// What Braze's rate-limit headers said, when it said anything.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RateInfo {
    /// Requests the window allows (`X-RateLimit-Limit`).
    pub limit: Option<u64>,
    pub remaining: Option<u64>,
    /// Time until the window resets.
    pub reset_in: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum TrackOutcome {
    /// 2xx: everything not named in `errors` is Braze's now.
    Accepted {
        errors: Vec<ObjectError>,
        rate: RateInfo,
    },
    /// 400: Braze refused the whole request because of something in it; nothing was applied.
    /// `errors` names objects at fault when Braze says (every object invalid: "Valid data must
    /// be provided", <https://www.braze.com/docs/api/endpoints/user_data/post_user_track>);
    /// otherwise the batch is split to find the record at fault.
    Refused {
        status: u16,
        message: String,
        errors: Vec<ObjectError>,
    },
    /// 413: the body is too big; split it.
    TooLarge,
    /// 401, 403, 404: the key, its permissions or the endpoint are wrong. No record is at
    /// fault; delivery pauses until someone fixes it.
    Misconfigured { status: u16, message: String },
    /// Transient: 429, 5xx, 408, timeouts, connection and DNS failures. Try again later, no
    /// sooner than `after` when Braze said so.
    Retry {
        reason: String,
        after: Option<Duration>,
        /// A 429: Braze's rate limit, not a failure of Braze.
        rate_limited: bool,
    },
}

/// What one `/users/export/ids` lookup got.
#[derive(Debug)]
pub enum ExportOutcome {
    /// The profiles Braze has among the ids asked for, and the ids it has none for.
    Found {
        users: Vec<serde_json::Value>,
        invalid: Vec<String>,
        rate: RateInfo,
    },
    /// 429, 5xx, 408, or an answer cut short: ask again, no sooner than `after` if given.
    Retry {
        reason: String,
        after: Option<Duration>,
    },
    /// Anything that asking again will not fix (the key, a permission, the endpoint, no
    /// answer at all), as `check` reports it.
    Failed(ProbeOutcome),
}

#[derive(Deserialize)]
struct ExportAnswer {
    #[serde(default)]
    users: Vec<serde_json::Value>,
    #[serde(default)]
    invalid_user_ids: Vec<String>,
}

/// What one `check` probe learned: whether the endpoint, the key and one permission work.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeOutcome {
    /// A 2xx with Braze's `"message": "success"`: the key holds this endpoint's permission.
    Ok,
    /// No HTTP answer at all (DNS, connection, TLS, timeout); `cause` is the error chain.
    Unreachable { kind: Unreachable, cause: String },
    /// 401: Braze does not know the key (wrong, revoked, or another instance's).
    KeyRejected { message: String },
    /// 403: the key is valid but lacks this endpoint's permission (`Access Denied`), or the
    /// account's plan or state does not allow the endpoint (`Forbidden`).
    PermissionMissing { message: String },
    /// 404 at `url`: the endpoint is not a Braze REST base URL.
    EndpointWrong { url: String, message: String },
    /// Anything else: 429, 5xx, a 400, or a 2xx that is not Braze's answer.
    Other { status: u16, message: String },
}

/// Why a request got no HTTP answer, as far as the error chain tells.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unreachable {
    /// The host name did not resolve.
    Dns,
    /// Nothing listens at that host and port.
    Refused,
    /// No answer within `braze.request_timeout_ms`.
    Timeout,
    /// The TLS handshake failed (a certificate, or a proxy intercepting TLS).
    Tls,
    /// Any other transport failure.
    Other,
}

/// The start of every synthetic `external_id` the `check` probes use, so anyone who ever
/// finds one in Braze knows where it came from.
pub const PROBE_ID_PREFIX: &str = "aiq-braze-sync-check-";

/// A fresh synthetic `external_id` for the `check` probes: the prefix and 64 random bits in
/// hex, so it is no real user's id and never the id of an earlier check.
pub fn probe_external_id() -> String {
    format!("{PROBE_ID_PREFIX}{:016x}", fastrand::u64(..))
}

/// Which of the client's connection pools a request goes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Connections {
    /// The general workers'.
    Shared,
    /// The event workers', driven by their own runtime.
    Events,
}

fn http_client(config: &BrazeConfig) -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .timeout(config.request_timeout)
        .connect_timeout(config.request_timeout.min(Duration::from_secs(10)))
        .pool_idle_timeout(Duration::from_secs(60))
        .user_agent(concat!("aiq-braze-sync/", env!("CARGO_PKG_VERSION")))
        // Braze's REST API does not redirect; following one would send the key wherever it
        // points. A 3xx is an answer, reported as a wrong endpoint.
        .redirect(reqwest::redirect::Policy::none())
        .build()
}

pub struct BrazeClient {
    http: reqwest::Client,
    /// A pool of its own for the event workers, which run on a runtime of their own: a
    /// connection's I/O is driven by the runtime that opened it, so sharing one pool would
    /// put events' answers back behind a backfill's work.
    events_http: reqwest::Client,
    track_url: String,
    /// `track_url` parsed once, not for every request (BENCHMARKS.md, "End to end beside
    /// syslog-ng (the peers bench)"). `None` only if it does not parse, and then each request
    /// reports why.
    track_target: Option<reqwest::Url>,
    export_ids_url: String,
    /// Replaced by a reload; read for each request.
    api_key: std::sync::RwLock<Secret>,
}

#[derive(Deserialize)]
struct Answer {
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    errors: Vec<AnswerError>,
}

#[derive(Deserialize)]
struct AnswerError {
    #[serde(rename = "type", default)]
    kind: Option<String>,
    #[serde(default)]
    input_array: Option<String>,
    #[serde(default)]
    index: Option<usize>,
}

/// Installs ring as rustls's provider once per process (reqwest is built without one so that
/// aws-lc, slow to build, stays out of the tree).
pub fn install_tls_provider() {
    // Fails only if a provider is already installed, which is what we want anyway.
    let _ = rustls::crypto::ring::default_provider().install_default();
}

impl BrazeClient {
    pub fn new(config: &BrazeConfig) -> Result<BrazeClient, reqwest::Error> {
        install_tls_provider();
        let track_url = format!("{}/users/track", config.endpoint);
        Ok(BrazeClient {
            http: http_client(config)?,
            events_http: http_client(config)?,
            track_target: reqwest::Url::parse(&track_url).ok(),
            track_url,
            export_ids_url: format!("{}/users/export/ids", config.endpoint),
            api_key: std::sync::RwLock::new(config.api_key.clone()),
        })
    }

    /// Uses `key` from the next request on (a reload).
    pub fn set_api_key(&self, key: Secret) {
        *self.api_key.write().expect("api key lock poisoned") = key;
    }

    fn bearer(&self) -> String {
        let key = self.api_key.read().expect("api key lock poisoned");
        format!("Bearer {}", key.expose())
    }

    /// Sends one `/users/track` request on the given connections.
    pub async fn track(&self, connections: Connections, body: Vec<u8>) -> TrackOutcome {
        let http = match connections {
            Connections::Shared => &self.http,
            Connections::Events => &self.events_http,
        };
        let request = match &self.track_target {
            Some(url) => http.post(url.clone()),
            None => http.post(&self.track_url),
        };
        let sent = request
            .header(CONTENT_TYPE, "application/json")
            .header(AUTHORIZATION, self.bearer())
            .body(body)
            .send()
            .await;
        let response = match sent {
            Ok(r) => r,
            Err(e) => {
                return TrackOutcome::Retry {
                    reason: describe_transport_error(&e),
                    after: None,
                    rate_limited: false,
                }
            }
        };
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let text = match read_capped(response).await {
            Ok(t) => String::from_utf8_lossy(&t).into_owned(),
            Err(why) => {
                // On a 2xx Braze has taken the request; resending would duplicate events, so
                // only the per-object errors are unknown. Say so rather than guess.
                if (200..300).contains(&status) {
                    tracing::warn!(status, error = %why,
                        "Braze accepted a request but its answer was not read whole; per-object errors, if any, are unknown");
                }
                String::new()
            }
        };
        classify(status, &headers, &text)
    }

    /// Proves the key may call `/users/track` without changing any user's data.
    ///
    /// It sends one attributes object for `external_id` (a fresh [`probe_external_id`]) with
    /// `"_update_existing_only": true` and one custom attribute, `aiq_braze_sync_check`. In
    /// update-only mode Braze creates no profile for an unknown `external_id`
    /// (`_update_existing_only`,
    /// <https://www.braze.com/docs/api/objects_filters/user_attributes_object>), and no
    /// profile has this random id, so the object updates nobody and creates nobody.
    /// Braze still checks the key and its `users.track` permission first, which is all the
    /// answer has to tell. The attribute is a custom one with a self-describing name so
    /// that, were Braze ever to apply it, whoever finds it knows what wrote it.
    pub async fn probe_track(&self, external_id: &str) -> ProbeOutcome {
        let body = serde_json::json!({
            "attributes": [{
                "external_id": external_id,
                "_update_existing_only": true,
                "aiq_braze_sync_check": true,
            }]
        });
        self.probe(&self.track_url, &body).await
    }

    /// Proves the key may call `/users/export/ids`: asks for the `external_id` of the
    /// synthetic user, which reads nothing of anyone's. `fields_to_export` is mandatory for
    /// accounts onboarded since August 2024
    /// (<https://www.braze.com/docs/api/endpoints/export/user_data/post_users_identifier>).
    pub async fn probe_export_ids(&self, external_id: &str) -> ProbeOutcome {
        let body = serde_json::json!({
            "external_ids": [external_id],
            "fields_to_export": ["external_id"],
        });
        self.probe(&self.export_ids_url, &body).await
    }

    /// Looks up at most 50 `external_ids` (Braze's limit per call,
    /// <https://www.braze.com/docs/api/endpoints/export/user_data/post_users_identifier>)
    /// with their custom attributes, for `reconcile`.
    pub async fn export_ids(&self, external_ids: &[String]) -> ExportOutcome {
        let body = serde_json::json!({
            "external_ids": external_ids,
            "fields_to_export": ["external_id", "custom_attributes"],
        });
        let response = match self.post_json(&self.export_ids_url, body.to_string()).await {
            Ok(r) => r,
            Err(e) => {
                return ExportOutcome::Failed(ProbeOutcome::Unreachable {
                    kind: unreachable_kind(&e),
                    cause: describe_transport_error(&e),
                })
            }
        };
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let text = match read_capped(response).await {
            Ok(text) => String::from_utf8_lossy(&text).into_owned(),
            Err(why) => {
                return ExportOutcome::Retry {
                    reason: format!("answered {status}, then the answer was not read whole: {why}"),
                    after: None,
                }
            }
        };
        match status {
            200..=299 => match serde_json::from_str::<ExportAnswer>(&text) {
                Ok(answer) => ExportOutcome::Found {
                    users: answer.users,
                    invalid: answer.invalid_user_ids,
                    rate: rate_info(&headers),
                },
                Err(e) => ExportOutcome::Failed(ProbeOutcome::Other {
                    status,
                    message: format!("not an export answer ({e})"),
                }),
            },
            429 | 500..=599 | 408 => ExportOutcome::Retry {
                reason: format!(
                    "{status}: {}",
                    text.trim().chars().take(200).collect::<String>()
                ),
                after: retry_after(&headers)
                    .or(rate_info(&headers).reset_in.filter(|_| status == 429)),
            },
            _ => ExportOutcome::Failed(classify_probe(status, &self.export_ids_url, &text)),
        }
    }

    /// Forwards a `/users/export/ids` request as it came and returns Braze's answer as it
    /// came (status, JSON body). It is a read: nothing is queued, and a client that checks
    /// users through the daemon sees exactly what Braze says. `Err` when Braze could not be
    /// reached at all.
    pub async fn forward_export_ids(&self, body: Vec<u8>) -> Result<(u16, Vec<u8>), String> {
        let response = self
            .post_json(&self.export_ids_url, body)
            .await
            .map_err(|e| describe_transport_error(&e))?;
        let status = response.status().as_u16();
        let body = read_capped(response).await?;
        Ok((status, body))
    }

    /// POSTs a JSON body with the API key.
    async fn post_json(
        &self,
        url: &str,
        body: impl Into<reqwest::Body>,
    ) -> reqwest::Result<reqwest::Response> {
        self.http
            .post(url)
            .header(CONTENT_TYPE, "application/json")
            .header(AUTHORIZATION, self.bearer())
            .body(body)
            .send()
            .await
    }

    async fn probe(&self, url: &str, body: &serde_json::Value) -> ProbeOutcome {
        let response = match self.post_json(url, body.to_string()).await {
            Ok(r) => r,
            Err(e) => {
                return ProbeOutcome::Unreachable {
                    kind: unreachable_kind(&e),
                    cause: describe_transport_error(&e),
                }
            }
        };
        let status = response.status().as_u16();
        match read_capped(response).await {
            Ok(text) => classify_probe(status, url, &String::from_utf8_lossy(&text)),
            Err(why) => ProbeOutcome::Unreachable {
                kind: Unreachable::Other,
                cause: format!("answered {status}, then the answer was not read whole: {why}"),
            },
        }
    }
}

/// Braze answers with small JSON bodies (an export of 50 full profiles stays far below this):
/// an answer past this size is not read on, so a wrong endpoint cannot fill memory.
const MAX_ANSWER_BYTES: usize = 16 << 20;

/// Reads an answer's body, up to `MAX_ANSWER_BYTES`.
async fn read_capped(mut response: reqwest::Response) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| describe_transport_error(&e))?
    {
        if body.len() + chunk.len() > MAX_ANSWER_BYTES {
            return Err(format!("the answer is over {MAX_ANSWER_BYTES} bytes"));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// What a probe's answer means. Pure, so every status is tested without a network.
pub fn classify_probe(status: u16, url: &str, body: &str) -> ProbeOutcome {
    let answer: Option<Answer> = serde_json::from_str(body).ok();
    let braze_message = answer.and_then(|a| a.message);
    let message = braze_message
        .clone()
        .unwrap_or_else(|| body.trim().chars().take(200).collect());
    match status {
        200..=299 if braze_message.as_deref() == Some("success") => ProbeOutcome::Ok,
        // Something answered, but not the way Braze does: a proxy's or a web server's page.
        200..=299 => ProbeOutcome::Other {
            status,
            message: format!("an answer that is not Braze's ({message:?})"),
        },
        401 => ProbeOutcome::KeyRejected { message },
        403 => ProbeOutcome::PermissionMissing { message },
        404 => ProbeOutcome::EndpointWrong {
            url: url.to_owned(),
            message,
        },
        // Braze does not redirect, and no redirect is followed (the key would go along).
        300..=399 => ProbeOutcome::EndpointWrong {
            url: url.to_owned(),
            message: format!("answered {status}, a redirect: Braze's REST API does not redirect"),
        },
        _ => ProbeOutcome::Other { status, message },
    }
}

/// Sorts a transport error by what the operator should look at. reqwest wraps hyper, which
/// wraps the resolver, rustls and the socket, so the chain is searched.
fn unreachable_kind(e: &reqwest::Error) -> Unreachable {
    if e.is_timeout() {
        return Unreachable::Timeout;
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    let mut text = String::new();
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            match io.kind() {
                std::io::ErrorKind::ConnectionRefused => return Unreachable::Refused,
                std::io::ErrorKind::TimedOut => return Unreachable::Timeout,
                _ => {}
            }
            // tokio-rustls hands rustls's error over wrapped in an io::Error, whose `source`
            // skips the wrapped error itself.
            if io
                .get_ref()
                .is_some_and(|inner| inner.is::<rustls::Error>())
            {
                return Unreachable::Tls;
            }
        }
        if s.downcast_ref::<rustls::Error>().is_some() {
            return Unreachable::Tls;
        }
        text.push_str(&s.to_string().to_ascii_lowercase());
        text.push('\n');
        source = s.source();
    }
    if text.contains("dns error") || text.contains("failed to lookup address") {
        Unreachable::Dns
    } else if text.contains("certificate") || text.contains("tls") || text.contains("handshake") {
        Unreachable::Tls
    } else {
        Unreachable::Other
    }
}

fn describe_transport_error(e: &reqwest::Error) -> String {
    // reqwest's Display already omits headers; the URL carries no secret.
    let kind = if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connection failed"
    } else {
        "request failed"
    };
    let mut msg = format!("{kind}: {e}");
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        msg.push_str(&format!(": {s}"));
        source = s.source();
    }
    msg
}

/// The objects an answer names in `errors`, with Braze's reason for each.
fn object_errors(answer: Option<Answer>) -> Vec<ObjectError> {
    answer
        .map(|a| {
            a.errors
                .into_iter()
                .filter_map(|e| {
                    Some(ObjectError {
                        input_array: e.input_array?,
                        index: e.index?,
                        reason: e.kind.unwrap_or_else(|| "refused by Braze".into()),
                    })
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Decides what an answer means. Pure, so every status is tested without a network.
pub fn classify(status: u16, headers: &HeaderMap, body: &str) -> TrackOutcome {
    let answer: Option<Answer> = serde_json::from_str(body).ok();
    let message = answer
        .as_ref()
        .and_then(|a| a.message.clone())
        .unwrap_or_else(|| body.chars().take(200).collect());
    // An error that does not say which object it is about: something was refused, and counting
    // the request as delivered would lose it silently. Split the batch as for a 400 until the
    // record at fault is alone (records Braze took are sent again: at least once).
    let unnamed = answer.as_ref().and_then(|a| {
        a.errors
            .iter()
            .find(|e| e.input_array.is_none() || e.index.is_none())
    });
    if let (200..=299, Some(e)) = (status, unnamed) {
        let kind = e.kind.as_deref().unwrap_or("no reason given");
        return TrackOutcome::Refused {
            status,
            message: format!("an error that names no object ({kind})"),
            errors: Vec::new(),
        };
    }
    match status {
        200..=299 => TrackOutcome::Accepted {
            errors: object_errors(answer),
            rate: rate_info(headers),
        },
        400 => TrackOutcome::Refused {
            status,
            message,
            errors: object_errors(answer),
        },
        413 => TrackOutcome::TooLarge,
        401 | 403 | 404 => TrackOutcome::Misconfigured { status, message },
        // Braze's REST API does not redirect, and the client follows no redirect (the key
        // would go along): the endpoint is wrong. Delivery pauses until it is fixed.
        300..=399 => TrackOutcome::Misconfigured {
            status,
            message: format!(
                "braze.endpoint redirects to {}; set it to the instance's REST endpoint",
                header(headers, "location").unwrap_or("another address")
            ),
        },
        429 => TrackOutcome::Retry {
            reason: format!("429 rate limited: {message}"),
            after: retry_after(headers),
            rate_limited: true,
        },
        _ => TrackOutcome::Retry {
            reason: format!("{status}: {message}"),
            after: retry_after(headers),
            rate_limited: false,
        },
    }
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    // HeaderMap lookups ignore case, so HTTP/2's lower-case names match too.
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}

/// How long Braze asked us to wait: `X-Ratelimit-Retry-After` (seconds), `Retry-After`
/// (seconds or an HTTP date), or failing those, when `X-RateLimit-Remaining` is 0, the rate
/// window's reset.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let seconds = |v: &str| v.parse::<f64>().ok().filter(|s| *s >= 0.0);
    if let Some(s) = header(headers, "x-ratelimit-retry-after").and_then(seconds) {
        return Some(Duration::from_secs_f64(s));
    }
    if let Some(v) = header(headers, "retry-after") {
        if let Some(s) = seconds(v) {
            return Some(Duration::from_secs_f64(s));
        }
        if let Ok(when) = httpdate::parse_http_date(v) {
            return Some(
                when.duration_since(SystemTime::now())
                    .unwrap_or(Duration::ZERO),
            );
        }
    }
    rate_info(headers).reset_in.filter(|_| {
        header(headers, "x-ratelimit-remaining").and_then(|v| v.parse::<u64>().ok()) == Some(0)
    })
}

/// Reads `X-RateLimit-Limit`, `-Remaining` and `-Reset`
/// (<https://www.braze.com/docs/api/api_limits>). Reset is epoch seconds on most accounts and
/// seconds remaining on MAU-priced ones; a value below a billion is the latter.
pub fn rate_info(headers: &HeaderMap) -> RateInfo {
    let limit = header(headers, "x-ratelimit-limit").and_then(|v| v.parse().ok());
    let remaining = header(headers, "x-ratelimit-remaining").and_then(|v| v.parse().ok());
    let reset_in = header(headers, "x-ratelimit-reset")
        .and_then(|v| v.parse::<f64>().ok())
        .map(|v| {
            if v >= 1e9 {
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs_f64())
                    .unwrap_or(0.0);
                Duration::from_secs_f64((v - now).max(0.0))
            } else {
                Duration::from_secs_f64(v.max(0.0))
            }
        });
    RateInfo {
        limit,
        remaining,
        reset_in,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn a_redirect_is_a_wrong_endpoint_never_followed() {
        let h = headers(&[("location", "https://elsewhere.example/users/track")]);
        let TrackOutcome::Misconfigured { status, message } = classify(301, &h, "") else {
            panic!("a redirect must pause delivery");
        };
        assert_eq!(status, 301);
        assert!(message.contains("elsewhere.example"), "{message}");
        assert!(matches!(
            classify_probe(302, "https://rest.example/users/track", ""),
            ProbeOutcome::EndpointWrong { .. }
        ));
    }

    #[test]
    fn a_201_with_an_error_naming_no_object_is_split_like_a_400() {
        for error in [
            r#"{"type":"EMAIL_BAD_FORMAT","index":3}"#,
            r#"{"type":"EMAIL_BAD_FORMAT","input_array":"attributes"}"#,
            r#"{"type":"EMAIL_BAD_FORMAT"}"#,
        ] {
            let body = format!(r#"{{"message":"success","errors":[{error}]}}"#);
            let outcome = classify(201, &HeaderMap::new(), &body);
            let TrackOutcome::Refused {
                status,
                errors,
                message,
            } = outcome
            else {
                panic!("{error}: {outcome:?}");
            };
            assert_eq!((status, errors), (201, vec![]), "{error}");
            assert!(message.contains("EMAIL_BAD_FORMAT"), "{message}");
        }
    }

    #[test]
    fn a_201_with_errors_names_the_refused_objects() {
        let body = r#"{"message":"success","errors":[{"type":"EMAIL_BAD_FORMAT","input_array":"attributes","index":3}]}"#;
        let TrackOutcome::Accepted { errors, .. } = classify(201, &HeaderMap::new(), body) else {
            panic!("not accepted")
        };
        assert_eq!(
            errors,
            vec![ObjectError {
                input_array: "attributes".into(),
                index: 3,
                reason: "EMAIL_BAD_FORMAT".into()
            }]
        );
    }

    #[test]
    fn statuses_map_to_named_outcomes() {
        let none = HeaderMap::new();
        assert!(matches!(
            classify(400, &none, "{}"),
            TrackOutcome::Refused { .. }
        ));
        assert_eq!(classify(413, &none, ""), TrackOutcome::TooLarge);
        for s in [401, 403, 404] {
            assert!(matches!(
                classify(s, &none, ""),
                TrackOutcome::Misconfigured { .. }
            ));
        }
        for s in [408, 429, 500, 502, 503, 504] {
            assert!(matches!(classify(s, &none, ""), TrackOutcome::Retry { .. }));
        }
    }

    #[test]
    fn probe_answers_map_to_what_the_operator_must_fix() {
        let url = "https://rest.iad-01.braze.com/users/track";
        let success = r#"{"message":"success","attributes_processed":1}"#;
        assert_eq!(classify_probe(201, url, success), ProbeOutcome::Ok);
        let key = classify_probe(401, url, r#"{"message":"Invalid API Key"}"#);
        let message = "Invalid API Key".to_owned();
        assert_eq!(key, ProbeOutcome::KeyRejected { message });
        let denied = classify_probe(403, url, r#"{"message":"Access Denied"}"#);
        let message = "Access Denied".to_owned();
        assert_eq!(denied, ProbeOutcome::PermissionMissing { message });
        let wrong = classify_probe(404, url, "<html>Not Found</html>");
        let (url, message) = (url.to_owned(), "<html>Not Found</html>".to_owned());
        assert_eq!(wrong, ProbeOutcome::EndpointWrong { url, message });
        let busy = classify_probe(503, "u", r#"{"message":"Service Unavailable"}"#);
        let message = "Service Unavailable".to_owned();
        assert_eq!(
            busy,
            ProbeOutcome::Other {
                status: 503,
                message
            }
        );
    }

    #[test]
    fn a_2xx_that_is_not_braze_s_answer_is_not_taken_as_success() {
        let page = classify_probe(200, "u", "<html>Welcome</html>");
        assert!(
            matches!(&page, ProbeOutcome::Other { status: 200, message } if message.contains("not Braze's")),
            "{page:?}"
        );
    }

    #[test]
    fn probe_ids_are_synthetic_and_fresh() {
        let (a, b) = (probe_external_id(), probe_external_id());
        assert!(a.starts_with(PROBE_ID_PREFIX) && a.len() == PROBE_ID_PREFIX.len() + 16);
        assert_ne!(a, b);
    }

    #[test]
    fn retry_after_is_read_from_either_header_in_any_case() {
        let h = headers(&[("x-ratelimit-retry-after", "7")]);
        assert_eq!(retry_after(&h), Some(Duration::from_secs(7)));
        let h = headers(&[("Retry-After", "3")]);
        assert_eq!(retry_after(&h), Some(Duration::from_secs(3)));
        assert_eq!(retry_after(&HeaderMap::new()), None);
    }

    #[test]
    fn reset_is_understood_as_epoch_or_seconds_remaining() {
        let h = headers(&[("x-ratelimit-reset", "30")]);
        assert_eq!(rate_info(&h).reset_in, Some(Duration::from_secs(30)));
        let soon = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 60;
        let h = headers(&[
            ("X-RateLimit-Reset", &soon.to_string()),
            ("X-RateLimit-Remaining", "0"),
        ]);
        let wait = retry_after(&h).unwrap();
        assert!(wait > Duration::from_secs(55) && wait <= Duration::from_secs(60));
    }
}
