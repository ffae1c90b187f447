//! Life under systemd: the notify protocol, the watchdog, and reloading on SIGHUP.
//!
//! `READY=1` goes out once the queue is open and the listener bound (`commands::run`);
//! `STATUS=` every few seconds says how much is pending and what delivery is doing;
//! `WATCHDOG=1` goes out only while no worker is stuck inside a step that has its own bound
//! (`delivery::activity`), so a wedged worker stops the pings and systemd restarts the
//! service, queue intact. Outside systemd (no `NOTIFY_SOCKET`) every message is a no-op.
//! This module never stops or restarts anything itself: systemd does, and a reload never
//! logs a secret.

use std::path::Path;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

use sd_notify::NotifyState;
use tokio::task::JoinHandle;
use tracing::level_filters::LevelFilter;

use crate::config::Config;
use crate::daemon::Running;
use crate::delivery::gate::Health;
use crate::logging::LevelHandle;

/// How often `STATUS=` is refreshed when there is no watchdog to pace it.
const STATUS_EVERY: Duration = Duration::from_secs(2);

fn notify(states: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!(error = %e, "cannot reach systemd's notify socket");
    }
}

pub fn ready() {
    notify(&[NotifyState::Ready]);
}

pub fn stopping() {
    notify(&[NotifyState::Stopping]);
}

/// The watchdog's settings, from `WATCHDOG_USEC` (systemd's `WatchdogSec=`).
#[derive(Debug, Clone, Copy)]
pub struct Watchdog {
    /// How often to ping: a quarter of systemd's interval, so a late ping or two is harmless.
    pub ping_every: Duration,
    /// A bounded step running longer than this counts as wedged: three quarters of the
    /// interval, leaving the last quarter for the final ping to be missed.
    pub stall_limit: Duration,
}

impl Watchdog {
    pub fn from_env() -> Option<Watchdog> {
        sd_notify::watchdog_enabled().map(|interval| Watchdog {
            ping_every: interval / 4,
            stall_limit: interval * 3 / 4,
        })
    }
}

/// Sends `STATUS=` and, with a watchdog, `WATCHDOG=1` while delivery makes progress. Logs
/// once when the pings stop and once when they resume.
pub fn supervise(
    running: &Running,
    watchdog: Option<Watchdog>,
    request_timeout: Duration,
    stop: CancellationToken,
) -> JoinHandle<()> {
    if let Some(w) = watchdog {
        if request_timeout >= w.stall_limit {
            tracing::warn!(
                request_timeout_ms = request_timeout.as_millis() as u64,
                stall_limit_ms = w.stall_limit.as_millis() as u64,
                "braze.request_timeout_ms is not below three quarters of WatchdogSec: a slow \
                 Braze answer will look like a wedged worker and systemd will restart the service"
            );
        }
    }
    let delivery = std::sync::Arc::clone(&running.delivery);
    let queue = std::sync::Arc::clone(&running.queue);
    // One line: depth and delivery state, what an operator looks for in `systemctl status`.
    let status_of = {
        let delivery = std::sync::Arc::clone(&delivery);
        move || {
            let pending = queue.pending();
            let dead = queue.stats().map(|s| s.dead).unwrap_or(0);
            let state = match delivery.gate.health() {
                Health::Delivering => "delivering".to_string(),
                Health::Retrying { reason, failures } => {
                    format!("retrying after {failures} failures ({reason})")
                }
                Health::Paused { reason, .. } => {
                    format!("PAUSED: Braze refuses the key or endpoint ({reason})")
                }
            };
            format!("{state}; {pending} pending, {dead} dead-lettered")
        }
    };
    let tick = watchdog.map_or(STATUS_EVERY, |w| w.ping_every.min(STATUS_EVERY));
    tokio::spawn(async move {
        let mut last_status = String::new();
        let mut wedged = false;
        loop {
            let status = status_of();
            let mut states = Vec::new();
            if status != last_status {
                states.push(NotifyState::Status(&status));
            }
            if let Some(w) = watchdog {
                let longest = delivery.activity.longest_step();
                if longest <= w.stall_limit {
                    states.push(NotifyState::Watchdog);
                    if wedged {
                        tracing::info!("delivery is making progress again; watchdog pings resumed");
                        wedged = false;
                    }
                } else if !wedged {
                    tracing::error!(
                        stuck_for_ms = longest.as_millis() as u64,
                        "a delivery step is stuck past its bound; watchdog pings stopped, \
                         systemd will restart the service (nothing queued is lost)"
                    );
                    wedged = true;
                }
            }
            if !states.is_empty() {
                notify(&states);
            }
            last_status = status;
            tokio::select! {
                _ = tokio::time::sleep(tick) => {}
                _ = stop.cancelled() => return,
            }
        }
    })
}

/// Re-reads the config file and applies what can change without a restart: the log level,
/// the rate ceiling, the ingest token and the Braze API key. Says what it applied and what
/// needs a restart; a file that does not load changes nothing. Never logs a secret.
pub fn reload(running: &Running, path: &Path, current: &mut Config, log_level: &LevelHandle) {
    notify(&[
        NotifyState::Reloading,
        NotifyState::monotonic_usec_now().unwrap_or(NotifyState::MonotonicUsec(0)),
    ]);
    let mut new = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            for line in e.to_string().lines() {
                tracing::error!(config = %path.display(), "reload refused, running configuration kept: {line}");
            }
            ready();
            return;
        }
    };
    if std::env::var_os("CREDENTIALS_DIRECTORY").is_some() {
        // systemd copies LoadCredential= files only when the service starts (Debian 12's
        // systemd 252 cannot refresh them on reload), so a replaced key file is not seen here.
        tracing::info!(
            "secrets from $CREDENTIALS_DIRECTORY are the copies systemd made at start; \
             restart the service to use a replaced key or token file"
        );
    }
    let mut applied = Vec::new();
    if new.log.level != current.log.level {
        match log_level.set(new.log.level) {
            Ok(()) => applied.push(format!(
                "log.level {} -> {}",
                level_name(current.log.level),
                level_name(new.log.level)
            )),
            Err(e) => tracing::error!(error = %e, "cannot change the log level"),
        }
    }
    if new.delivery.max_requests_per_second != current.delivery.max_requests_per_second {
        running
            .delivery
            .gate
            .set_max_requests_per_second(new.delivery.max_requests_per_second);
        let show = |r: Option<f64>| r.map_or("none".to_string(), |r| r.to_string());
        applied.push(format!(
            "delivery.max_requests_per_second {} -> {}",
            show(current.delivery.max_requests_per_second),
            show(new.delivery.max_requests_per_second)
        ));
    }
    let token_of = |c: &Config| c.ingest.token.as_ref().map(|t| t.expose().to_string());
    // The socket stays bound where it was until a restart: a reload is judged against that
    // address, not the file's. A file that now says loopback and no token must not open a
    // public socket to anyone.
    let bound = running.addr;
    let unguarded = new.ingest.token.is_none() && !crate::config::is_loopback_ip(bound.ip());
    if unguarded {
        tracing::error!(%bound,
            "reload: ingest.token kept: the daemon is still bound to {bound}, which is not \
             loopback, and ingest there needs a token; change ingest.listen and restart to drop it");
        new.ingest.token = current.ingest.token.clone();
    }
    if token_of(&new) != token_of(current) {
        *running.state.token.write().expect("token lock poisoned") = new.ingest.token.clone();
        applied.push("ingest.token (changed)".into());
    }
    if new.braze.api_key.expose() != current.braze.api_key.expose() {
        running
            .delivery
            .client
            .set_api_key(new.braze.api_key.clone());
        applied.push("braze.api_key (changed)".into());
    }
    let mut need_restart = Vec::new();
    let mut differs = |name: &str, changed: bool| {
        if changed {
            need_restart.push(name.to_string());
        }
    };
    // Every other key: read at start only. Listed one by one, so that a key added to the
    // config without a place here is caught by the reload test, not ignored in silence.
    let (n, c) = (&new, &*current);
    differs("data_dir", n.data_dir != c.data_dir);
    differs("braze.endpoint", n.braze.endpoint != c.braze.endpoint);
    differs(
        "braze.request_timeout_ms",
        n.braze.request_timeout != c.braze.request_timeout,
    );
    differs(
        "braze.max_objects_per_request",
        n.braze.max_objects_per_request != c.braze.max_objects_per_request,
    );
    differs(
        "braze.per_array_limit",
        n.braze.per_array_limit != c.braze.per_array_limit,
    );
    differs(
        "braze.max_request_bytes",
        n.braze.max_request_bytes != c.braze.max_request_bytes,
    );
    differs("ingest.listen", n.ingest.listen != c.ingest.listen);
    differs(
        "ingest.max_body_bytes",
        n.ingest.max_body_bytes != c.ingest.max_body_bytes,
    );
    differs(
        "ingest.header_timeout_ms",
        n.ingest.header_timeout != c.ingest.header_timeout,
    );
    differs(
        "ingest.upload_idle_timeout_ms",
        n.ingest.upload_idle_timeout != c.ingest.upload_idle_timeout,
    );
    differs(
        "ingest.min_body_rate",
        n.ingest.min_body_rate != c.ingest.min_body_rate,
    );
    differs(
        "ingest.body_grace_ms",
        n.ingest.body_grace != c.ingest.body_grace,
    );
    differs(
        "ingest.upload_timeout_ms",
        n.ingest.upload_timeout != c.ingest.upload_timeout,
    );
    differs(
        "ingest.max_connections",
        n.ingest.max_connections != c.ingest.max_connections,
    );
    differs(
        "ingest.export_passthrough",
        n.ingest.export_passthrough != c.ingest.export_passthrough,
    );
    differs(
        "ingest.allowed_origins",
        n.ingest.allowed_origins != c.ingest.allowed_origins,
    );
    differs(
        "ingest.allowed_hosts",
        n.ingest.allowed_hosts != c.ingest.allowed_hosts,
    );
    differs("delivery.workers", n.delivery.workers != c.delivery.workers);
    differs(
        "delivery.backoff_initial_ms",
        n.delivery.backoff_initial != c.delivery.backoff_initial,
    );
    differs(
        "delivery.backoff_max_ms",
        n.delivery.backoff_max != c.delivery.backoff_max,
    );
    differs(
        "delivery.shutdown_timeout_ms",
        n.delivery.shutdown_timeout != c.delivery.shutdown_timeout,
    );
    differs(
        "delivery.skip_unchanged_for_s",
        n.delivery.skip_unchanged_for != c.delivery.skip_unchanged_for,
    );
    differs(
        "queue.max_records",
        n.queue.max_records != c.queue.max_records,
    );
    differs(
        "queue.max_disk_bytes",
        n.queue.max_disk_bytes != c.queue.max_disk_bytes,
    );
    differs(
        "queue.min_free_disk_mb",
        n.queue.min_free_bytes != c.queue.min_free_bytes,
    );
    differs("queue.cache_mb", n.queue.cache_bytes != c.queue.cache_bytes);
    differs(
        "queue.compact_min_mb",
        n.queue.compact_min_bytes != c.queue.compact_min_bytes,
    );
    differs("identity.prefer", n.identity != c.identity);
    differs(
        "update_existing_only",
        n.update_existing_only != c.update_existing_only,
    );
    if applied.is_empty() {
        tracing::info!(config = %path.display(), "reloaded: nothing that can change live has changed");
    } else {
        tracing::info!(config = %path.display(), applied = %applied.join(", "), "reloaded");
    }
    if !need_restart.is_empty() {
        tracing::warn!(settings = %need_restart.join(", "), "changed settings take effect only after a restart");
    }
    // What can change live now matches the file; the rest keeps running as it started.
    current.log.level = new.log.level;
    current.delivery.max_requests_per_second = new.delivery.max_requests_per_second;
    current.ingest.token = new.ingest.token;
    current.braze.api_key = new.braze.api_key;
    ready();
}

fn level_name(level: LevelFilter) -> String {
    level.to_string().to_ascii_lowercase()
}
