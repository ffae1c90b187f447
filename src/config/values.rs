//! Checks of single values: the Braze endpoint, hosts, numbers, and toml's syntax errors
//! without the line that may hold a secret.

use super::*;

/// Checks a Braze REST endpoint and returns it without trailing `/`. The error is the "why"
/// part of the line; it does not echo the URL (someone may have pasted a key into it).
pub(super) fn check_endpoint(raw: &str) -> Result<String, String> {
    const EXAMPLE: &str = "https://rest.iad-01.braze.com";
    let url = raw.trim().trim_end_matches('/');
    if url.is_empty() {
        return Err("must not be empty".to_owned());
    }
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("must not contain whitespace".to_owned());
    }
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(format!(
            "must be a URL starting with https://, such as {EXAMPLE}"
        ));
    };
    let tls = match scheme.to_ascii_lowercase().as_str() {
        "https" => true,
        "http" => false,
        _ => {
            return Err(format!(
                "must start with https:// (http:// only for a loopback host), such as {EXAMPLE}"
            ))
        }
    };
    let (authority, path) = rest.split_at(rest.find(['/', '?', '#']).unwrap_or(rest.len()));
    if path.contains(['?', '#']) {
        return Err("must not contain a query or a fragment".to_owned());
    }
    if path.to_ascii_lowercase().ends_with("/users/track") {
        return Err(format!(
            "must be the instance's base URL, such as {EXAMPLE}, without /users/track"
        ));
    }
    if authority.contains('@') {
        return Err("must not contain user credentials".to_owned());
    }
    let host = split_host(authority)?;
    if !tls && !is_loopback_host(host) {
        return Err("plain http would send the API key unencrypted; use https".to_owned());
    }
    Ok(url.to_owned())
}

/// The host of `host[:port]` or `[v6][:port]`, checked to be well formed.
pub(super) fn split_host(authority: &str) -> Result<&str, String> {
    let (host, port) = if let Some(bracketed) = authority.strip_prefix('[') {
        let Some((host, after)) = bracketed.split_once(']') else {
            return Err("has an unclosed [ in its host".to_owned());
        };
        if host.parse::<Ipv6Addr>().is_err() {
            return Err("has an invalid IPv6 address as its host".to_owned());
        }
        match after {
            "" => (host, None),
            _ => match after.strip_prefix(':') {
                Some(port) => (host, Some(port)),
                None => return Err("has an invalid host".to_owned()),
            },
        }
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err("must include a host".to_owned());
    }
    let host_ok = authority.starts_with('[')
        || host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
    if !host_ok {
        return Err("has an invalid host".to_owned());
    }
    if let Some(port) = port {
        if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
            return Err("has an invalid port".to_owned());
        }
        if port.parse::<u16>().map_or(true, |port| port == 0) {
            return Err("has a port outside 1..=65535".to_owned());
        }
    }
    Ok(host)
}

/// `localhost`, 127.0.0.0/8 or ::1: traffic that never leaves the machine.
pub(super) fn is_loopback_host(host: &str) -> bool {
    let name = host.strip_suffix('.').unwrap_or(host);
    name.eq_ignore_ascii_case("localhost") || host.parse::<IpAddr>().is_ok_and(is_loopback_ip)
}

/// 127.0.0.0/8, ::1, or ::ffff:127.x: an address only this machine reaches.
pub fn is_loopback_ip(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_loopback(),
        IpAddr::V6(v6) => {
            v6.is_loopback() || v6.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback())
        }
    }
}

/// Every range handed to the section readers ends at or below 1 GiB, which fits a `usize` even
/// on 32-bit targets; the fallback is never taken.
pub(super) fn to_usize(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

/// "line L, column C: message", without toml's quote of the line (it may hold a secret).
pub(super) fn syntax_message(text: &str, err: &toml::de::Error) -> String {
    let message = err.message().trim().replace('\n', "; ");
    let Some(span) = err.span() else {
        return message;
    };
    let before = text.get(..span.start).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
    format!("line {line}, column {column}: {message}")
}
