//! `check`: proves, before the daemon runs, that the configured endpoint, API key and both
//! permissions work against the real Braze, without changing any real user's data.
//!
//! Two probes, both for one fresh synthetic `external_id` (`aiq-braze-sync-check-<hex>`):
//!
//! 1. `/users/track` with one update-only attributes object. Braze creates no profile for an
//!    unknown `external_id` in update-only mode
//!    (<https://www.braze.com/docs/api/objects_filters/user_attributes_object>), and no
//!    profile has this id, so nothing is written; the answer still proves the endpoint is
//!    reachable, the key is known and holds `users.track` ([`BrazeClient::probe_track`]).
//! 2. `/users/export/ids` for that id, asking only for `external_id`: proves
//!    `users.export.ids` and reads nothing of anyone's.
//!
//! One line per step goes to stdout (`ok   ...`, `FAIL ...: what Braze said — what to fix`,
//! `skip ...`), never the key. The [`CheckOutcome`] becomes the exit code; when both
//! permissions are missing both are reported. A failure that makes the next probe pointless
//! (unreachable, key rejected, endpoint wrong) stops there. `check` never queues anything and
//! never writes to a real user's profile.

use std::fmt;
use std::io::Write;

use crate::braze::{client::probe_external_id, BrazeClient, ProbeOutcome, Unreachable};
use crate::commands::ExitCode;
use crate::config::Config;

/// How `check` ended; each kind of failure has its own exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckOutcome {
    /// Endpoint, key and both permissions work. Exit 0.
    Passed,
    /// No HTTP answer from the endpoint (DNS, connection, TLS, timeout). Exit 3.
    Unreachable,
    /// Braze answered 401: the key is wrong, revoked or another instance's. Exit 4.
    KeyRejected,
    /// Braze answered 403 on at least one endpoint: a permission is missing. Exit 5.
    PermissionMissing,
    /// Braze answered 404: the endpoint is not a REST base URL. Exit 6.
    EndpointWrong,
    /// Anything else (429, 5xx, an answer that is not Braze's, a client that cannot be
    /// built). Exit 1.
    Failed,
}

impl CheckOutcome {
    pub fn exit_code(self) -> ExitCode {
        match self {
            CheckOutcome::Passed => ExitCode::Ok,
            CheckOutcome::Unreachable => ExitCode::Unreachable,
            CheckOutcome::KeyRejected => ExitCode::KeyRejected,
            CheckOutcome::PermissionMissing => ExitCode::PermissionMissing,
            CheckOutcome::EndpointWrong => ExitCode::EndpointWrong,
            CheckOutcome::Failed => ExitCode::Failure,
        }
    }

    /// `Ok` when the check passed, else a [`Failed`] error that carries the exit code, for
    /// `main` to print once and exit with.
    pub fn into_result(self) -> Result<(), Failed> {
        match self {
            CheckOutcome::Passed => Ok(()),
            outcome => Err(Failed(outcome)),
        }
    }

    /// Of two failures, the one to fix first: the more fundamental one, and any specific
    /// one before a generic [`CheckOutcome::Failed`].
    fn worst(self, other: CheckOutcome) -> CheckOutcome {
        let rank = |o: CheckOutcome| match o {
            CheckOutcome::Passed => 0,
            CheckOutcome::Failed => 1,
            CheckOutcome::PermissionMissing => 2,
            CheckOutcome::EndpointWrong => 3,
            CheckOutcome::KeyRejected => 4,
            CheckOutcome::Unreachable => 5,
        };
        if rank(other) > rank(self) {
            other
        } else {
            self
        }
    }
}

/// How `check` classes a failed lookup or probe (for `reconcile`, which exits with the same
/// codes).
pub fn outcome_of(probe: &ProbeOutcome) -> CheckOutcome {
    match probe {
        ProbeOutcome::Ok => CheckOutcome::Passed,
        ProbeOutcome::Unreachable { .. } => CheckOutcome::Unreachable,
        ProbeOutcome::KeyRejected { .. } => CheckOutcome::KeyRejected,
        ProbeOutcome::PermissionMissing { .. } => CheckOutcome::PermissionMissing,
        ProbeOutcome::EndpointWrong { .. } => CheckOutcome::EndpointWrong,
        ProbeOutcome::Other { .. } => CheckOutcome::Failed,
    }
}

/// A failed check, as an error: `main` prints it once and exits with [`Failed::exit_code`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Failed(pub CheckOutcome);

impl Failed {
    pub fn exit_code(&self) -> ExitCode {
        self.0.exit_code()
    }
}

impl fmt::Display for Failed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.0 {
            CheckOutcome::Passed => "passed",
            CheckOutcome::Unreachable => "Braze is unreachable",
            CheckOutcome::KeyRejected => "Braze rejected the API key",
            CheckOutcome::PermissionMissing => "the API key lacks a permission",
            CheckOutcome::EndpointWrong => "braze.endpoint is not a Braze REST endpoint",
            CheckOutcome::Failed => "Braze did not answer as expected",
        };
        write!(f, "check failed: {what} (see the FAIL lines above)")
    }
}

impl std::error::Error for Failed {}

/// Runs both probes against the configured Braze, printing one line per step to stdout.
pub async fn run(config: &Config) -> CheckOutcome {
    run_to(config, &mut std::io::stdout()).await
}

/// [`run`], printing to `out`. A failed write is ignored: the outcome still says it all.
pub async fn run_to(config: &Config, out: &mut dyn Write) -> CheckOutcome {
    let mut say = |line: String| {
        let _ = writeln!(out, "{line}");
    };
    let endpoint = config.braze.endpoint.as_str();
    let client = match BrazeClient::new(&config.braze) {
        Ok(c) => c,
        Err(e) => {
            say(format!("FAIL HTTP client: cannot be built: {e}"));
            return CheckOutcome::Failed;
        }
    };
    let id = probe_external_id();

    let track = client.probe_track(&id).await;
    if let ProbeOutcome::Unreachable { kind, cause } = &track {
        say(unreachable_line(config, *kind, cause));
        say(skipped("api key"));
        say(skipped("users.track permission"));
        say(skipped("users.export.ids permission"));
        return CheckOutcome::Unreachable;
    }
    say(format!("ok   endpoint {endpoint} reachable"));
    match &track {
        ProbeOutcome::KeyRejected { message } => {
            say(key_line(config, message));
            say(skipped("users.track permission"));
            say(skipped("users.export.ids permission"));
            return CheckOutcome::KeyRejected;
        }
        ProbeOutcome::EndpointWrong { url, message } => {
            say(endpoint_line(endpoint, url, message));
            say(skipped("api key"));
            say(skipped("users.track permission"));
            say(skipped("users.export.ids permission"));
            return CheckOutcome::EndpointWrong;
        }
        // Braze answers 403 only to a key it knows.
        ProbeOutcome::Ok | ProbeOutcome::PermissionMissing { .. } => {
            say("ok   api key accepted".into())
        }
        _ => {}
    }
    let mut outcome = match &track {
        ProbeOutcome::Ok => {
            say(format!(
                "ok   users.track permission (update-only probe for {id}: no profile created or changed)"
            ));
            CheckOutcome::Passed
        }
        other => say_failure(&mut say, config, "users.track", other),
    };

    let export = client.probe_export_ids(&id).await;
    outcome = outcome.worst(match &export {
        ProbeOutcome::Ok => {
            say("ok   users.export.ids permission".into());
            CheckOutcome::Passed
        }
        other => say_failure(&mut say, config, "users.export.ids", other),
    });

    if outcome == CheckOutcome::Passed {
        say(format!(
            "check passed: Braze at {endpoint} takes this API key for users.track and users.export.ids"
        ));
    }
    outcome
}

/// The FAIL line for a probe's failure, and what it means for the outcome.
fn say_failure(
    say: &mut impl FnMut(String),
    config: &Config,
    permission: &str,
    outcome: &ProbeOutcome,
) -> CheckOutcome {
    let endpoint = config.braze.endpoint.as_str();
    match outcome {
        ProbeOutcome::Ok => CheckOutcome::Passed,
        ProbeOutcome::Unreachable { kind, cause } => {
            say(unreachable_line(config, *kind, cause));
            CheckOutcome::Unreachable
        }
        ProbeOutcome::KeyRejected { message } => {
            say(key_line(config, message));
            CheckOutcome::KeyRejected
        }
        ProbeOutcome::EndpointWrong { url, message } => {
            say(endpoint_line(endpoint, url, message));
            CheckOutcome::EndpointWrong
        }
        ProbeOutcome::PermissionMissing { message } => {
            // Braze says "Access Denied" for a missing permission and "Forbidden" when the
            // account's plan excludes the endpoint or the account is inactive
            // (https://www.braze.com/docs/api/errors); the permission is the likely fix
            // either way, so it comes first.
            let account = if message.to_ascii_lowercase().contains("forbidden") {
                "; \"Forbidden\" can also mean the account's plan excludes this endpoint or the \
                 account is inactive: ask your Braze administrator"
            } else {
                ""
            };
            say(format!(
                "FAIL {permission} permission: Braze answered 403{} — give the REST API key the \
                 {permission} permission in Braze's dashboard (Settings > APIs and \
                 Identifiers); a key's permissions cannot be changed once it exists, so create \
                 a key with users.track and users.export.ids and configure that one{account}",
                braze_said(message)
            ));
            CheckOutcome::PermissionMissing
        }
        ProbeOutcome::Other { status, message } => {
            let fix = match status {
                429 => "Braze is rate limiting this key; run check again in a minute",
                500..=599 => {
                    "an error on Braze's side; run check again later (and see status.braze.com)"
                }
                200..=299 => {
                    "something other than Braze answered: braze.endpoint must be your \
                     instance's REST endpoint (https://rest.<instance>.braze.com), not the \
                     dashboard, and no proxy may rewrite the answer"
                }
                400 => "Braze refused the probe itself; please report this with the message",
                _ => "unexpected; check that braze.endpoint is your instance's REST endpoint",
            };
            say(format!(
                "FAIL {permission}: Braze answered {status}{} — {fix}",
                braze_said(message)
            ));
            CheckOutcome::Failed
        }
    }
}

fn skipped(step: &str) -> String {
    format!("skip {step}: not checked until the failure above is fixed")
}

/// `" <message>"` for a message Braze gave, nothing for an empty one.
fn braze_said(message: &str) -> String {
    match message.trim() {
        "" => String::new(),
        m => format!(" {m}"),
    }
}

fn unreachable_line(config: &Config, kind: Unreachable, cause: &str) -> String {
    let endpoint = &config.braze.endpoint;
    let fix = match kind {
        Unreachable::Dns => "the host name does not resolve: check the spelling of \
            braze.endpoint (like https://rest.iad-01.braze.com) and this machine's DNS"
            .to_owned(),
        Unreachable::Refused => "nothing accepts connections there: check the host and port \
            in braze.endpoint, and any firewall or proxy (HTTPS_PROXY) on the way"
            .to_owned(),
        Unreachable::Timeout => format!(
            "no answer within braze.request_timeout_ms ({} ms): a firewall dropping outbound \
             HTTPS, or a network that needs a proxy (set HTTPS_PROXY)",
            config.braze.request_timeout.as_millis()
        ),
        Unreachable::Tls => "the TLS handshake failed: a proxy that intercepts TLS (its CA \
            is not trusted here), a wrong host in braze.endpoint, or a wrong system clock"
            .to_owned(),
        Unreachable::Other => "check braze.endpoint, DNS, the network path, any proxy \
            (HTTPS_PROXY, NO_PROXY) and TLS"
            .to_owned(),
    };
    format!("FAIL endpoint {endpoint} unreachable: {cause} — {fix}")
}

fn key_line(config: &Config, message: &str) -> String {
    let key = config.braze.api_key.expose();
    // Said without showing the key: a quote Braze will never match is easy to miss in a file.
    let quoted = if key.starts_with(['"', '\'']) || key.ends_with(['"', '\'']) {
        " The key as read starts or ends with a quote character: remove the quotes."
    } else {
        ""
    };
    format!(
        "FAIL api key: Braze answered 401{} — the key is wrong, revoked, wrapped in quotes, or \
         belongs to another Braze instance: a key works only on its own instance, so check \
         that braze.endpoint ({}) is the REST endpoint of the dashboard where the key was \
         created.{quoted}",
        braze_said(message),
        config.braze.endpoint
    )
}

fn endpoint_line(endpoint: &str, url: &str, message: &str) -> String {
    format!(
        "FAIL endpoint {endpoint}: Braze answered 404{} at {url} — braze.endpoint must be the \
         REST endpoint of your instance, like https://rest.iad-01.braze.com, without a path",
        braze_said(message)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_more_fundamental_failure_decides_the_exit_code() {
        use CheckOutcome::*;
        assert_eq!(Passed.worst(PermissionMissing), PermissionMissing);
        assert_eq!(Failed.worst(PermissionMissing), PermissionMissing);
        assert_eq!(PermissionMissing.worst(Failed), PermissionMissing);
        assert_eq!(PermissionMissing.worst(EndpointWrong), EndpointWrong);
        assert_eq!(KeyRejected.worst(Unreachable), Unreachable);
        assert_eq!(Passed.worst(Passed), Passed);
    }

    #[test]
    fn every_outcome_has_its_documented_exit_code() {
        let codes: Vec<u8> = [
            CheckOutcome::Passed,
            CheckOutcome::Failed,
            CheckOutcome::Unreachable,
            CheckOutcome::KeyRejected,
            CheckOutcome::PermissionMissing,
            CheckOutcome::EndpointWrong,
        ]
        .iter()
        .map(|o| o.exit_code() as u8)
        .collect();
        assert_eq!(codes, [0, 1, 3, 4, 5, 6]);
    }

    #[test]
    fn a_quoted_key_is_pointed_out_without_being_shown() {
        let config = Config::for_local(
            "/tmp/unused".into(),
            "http://127.0.0.1:9".into(),
            "\"secret-key\"",
        );
        let line = key_line(&config, "Invalid API Key");
        assert!(line.contains("remove the quotes"), "{line}");
        assert!(!line.contains("secret-key"), "{line}");
    }
}
