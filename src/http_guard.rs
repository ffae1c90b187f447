//! What keeps browsers out of the daemon's API: a web page can make a browser send requests to
//! a local address (a form post needs no permission) or rebind a DNS name of its own to this
//! machine. Three checks, before the token and before any body is read:
//!
//! - **Origin.** Browsers send an `Origin` header with every cross-site request and with
//!   every POST; other clients do not. A request carrying one is refused (403) unless
//!   `ingest.allowed_origins` lists it.
//! - **Host.** A DNS-rebinding page reaches the daemon under its own DNS name, which arrives
//!   as the `Host` header. A `Host` that is an IP address of the bound socket (any, when bound
//!   to all addresses) or `localhost` on loopback is taken; a name must be listed in
//!   `ingest.allowed_hosts`. Otherwise 403. Ports are not compared: an IP literal involves no
//!   DNS.
//! - **Content type.** A form can only send `text/plain`, `application/x-www-form-urlencoded`
//!   or `multipart/form-data`. A body with any type other than JSON, NDJSON (or CSV for a
//!   snapshot) is refused with 415; a request without a type is taken (no browser form sends
//!   one without it).
//!
//! The guard owns these three refusals only: it never reads a body and never checks the token
//! (`http.rs` does both, after it).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

/// What the checks compare against.
pub struct Guard {
    pub bound: SocketAddr,
    pub origins: Vec<String>,
    pub hosts: Vec<String>,
}

/// Media types a body may have; `text/csv` only for a snapshot upload.
const JSON_TYPES: &[&str] = &[
    "application/json",
    "application/x-ndjson",
    "application/ndjson",
    "application/jsonl",
    "application/x-jsonlines",
];

pub async fn check(State(guard): State<Arc<Guard>>, request: Request, next: Next) -> Response {
    match refusal(&guard, &request) {
        None => next.run(request).await,
        Some((status, why)) => {
            // The Braze-compatible endpoints answer in Braze's shape.
            let body = if request.uri().path().starts_with("/users/") {
                json!({ "message": why, "errors": [] })
            } else {
                json!({ "error": why })
            };
            (status, Json(body)).into_response()
        }
    }
}

fn refusal(guard: &Guard, request: &Request) -> Option<(StatusCode, String)> {
    let headers = request.headers();
    let text = |name| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(origin) = headers.get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("");
        if !guard.origins.iter().any(|o| o.eq_ignore_ascii_case(origin)) {
            return Some((
                StatusCode::FORBIDDEN,
                format!(
                    "requests from web pages are refused (Origin {origin:?}); list the origin in \
                     [ingest] allowed_origins to take them"
                ),
            ));
        }
    }
    if let Some(host) = text(header::HOST) {
        if !host_allowed(host, guard) {
            return Some((
                StatusCode::FORBIDDEN,
                format!(
                    "Host {host:?} is not this daemon's address; list the name in [ingest] \
                     allowed_hosts to take requests sent to it"
                ),
            ));
        }
    }
    let has_body = matches!(*request.method(), Method::POST | Method::PUT);
    if let (true, Some(content_type)) = (has_body, text(header::CONTENT_TYPE)) {
        let media = content_type
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        let csv_ok = request.uri().path().ends_with("/members") && media == "text/csv";
        if !csv_ok && !JSON_TYPES.contains(&media.as_str()) {
            return Some((
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!(
                    "Content-Type {media:?} is not taken: send application/json or \
                     application/x-ndjson (text/csv for a snapshot)"
                ),
            ));
        }
    }
    None
}

/// Whether `host` (a `Host` header: a name or an IP, with an optional port) names this
/// daemon; see the module doc.
fn host_allowed(host: &str, guard: &Guard) -> bool {
    let name = match host.strip_prefix('[') {
        // `[v6]` or `[v6]:port`
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            _ => host,
        },
    };
    let bound = guard.bound.ip();
    if let Ok(ip) = name.parse::<IpAddr>() {
        return bound.is_unspecified()
            || ip == bound
            || (crate::config::is_loopback_ip(bound) && crate::config::is_loopback_ip(ip));
    }
    let local = crate::config::is_loopback_ip(bound) || bound.is_unspecified();
    (local && name.eq_ignore_ascii_case("localhost"))
        || guard
            .hosts
            .iter()
            .any(|h| h.eq_ignore_ascii_case(name) || h.eq_ignore_ascii_case(host))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guard(bound: &str, hosts: &[&str]) -> Guard {
        Guard {
            bound: bound.parse().unwrap(),
            origins: Vec::new(),
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
        }
    }

    #[test]
    fn the_listen_address_localhost_and_listed_names_are_this_daemon() {
        let local = guard("127.0.0.1:8080", &["sync.internal"]);
        for host in [
            "127.0.0.1:8080",
            "127.0.0.1",
            "localhost:8080",
            "LOCALHOST",
            "[::1]:8080",
            "sync.internal",
            "SYNC.internal:9",
        ] {
            assert!(host_allowed(host, &local), "{host}");
        }
        for host in [
            "evil.example:8080",
            "evil.example",
            "10.0.0.5:8080",
            "localhost.evil.example",
        ] {
            assert!(!host_allowed(host, &local), "{host}");
        }
        let public = guard("0.0.0.0:8080", &[]);
        assert!(host_allowed("10.0.0.5:8080", &public));
        assert!(!host_allowed("rebound.example:8080", &public));
        let one = guard("10.0.0.5:8080", &[]);
        assert!(host_allowed("10.0.0.5:8080", &one));
        assert!(!host_allowed("localhost:8080", &one));
    }
}
