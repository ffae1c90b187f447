//! What each command does. Errors carry context here (anyhow) and are never printed here:
//! `main` prints them once.

use std::io::Write;
use std::time::Duration;

use anyhow::{bail, Context};
use futures_util::StreamExt;
use serde_json::{json, Value};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook_tokio::Signals;

use crate::cli::{QueueCommand, Which};
use crate::config::Config;
use crate::daemon;
use crate::delivery::with_objects;
use crate::queue::{Backend, Selection};
use crate::service;
use crate::target::{Daemon, Target};

/// Exit codes, so scripts can tell a bad setup from a failure at run time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitCode {
    Ok = 0,
    Failure = 1,
    BadConfig = 2,
    /// `check`: no HTTP answer from braze.endpoint (DNS, connection, TLS, timeout).
    Unreachable = 3,
    /// `check`: Braze answered 401 to the API key.
    KeyRejected = 4,
    /// `check`: Braze answered 403: the key lacks users.track or users.export.ids.
    PermissionMissing = 5,
    /// `check`: Braze answered 404: braze.endpoint is not a REST base URL.
    EndpointWrong = 6,
    /// The queue's files are damaged: restarting cannot fix it (`run --accept-loss`).
    Damaged = 7,
}

pub async fn run(
    config: Config,
    path: &std::path::Path,
    log_level: crate::logging::LevelHandle,
) -> anyhow::Result<()> {
    for file in &config.exposed {
        tracing::warn!(%file, "a file holding a secret is readable by group or others: `chmod 600` it (and own it by the service's user)");
    }
    let mut signals =
        Signals::new([SIGTERM, SIGINT, SIGHUP]).context("cannot install signal handlers")?;
    let listener = tokio::net::TcpListener::bind(config.ingest.listen)
        .await
        .with_context(|| format!("cannot listen on {} (ingest.listen)", config.ingest.listen))?;
    let running = daemon::start(&config, listener).await?;
    // Only now is the database open and the listener bound: systemd may send traffic.
    service::ready();
    let supervisor = service::supervise(
        &running,
        service::Watchdog::from_env(),
        config.braze.request_timeout,
        running.stopping(),
    );
    let mut current = config;
    let gave_up = loop {
        tokio::select! {
            signal = signals.next() => match signal {
                Some(SIGHUP) => service::reload(&running, path, &mut current, &log_level),
                other => {
                    tracing::info!(signal = ?other, "stopping: ingest first, then delivery, then a final sync");
                    break None;
                }
            },
            why = storage_gave_up(&running.queue) => {
                tracing::error!(error = %why, "the queue's storage has failed for {} s and sled \
                    does not recover from a failed write in place: stopping so that a restart \
                    reopens it (nothing acknowledged is lost)", STORAGE_GIVE_UP.as_secs());
                break Some(why);
            }
        }
    };
    service::stopping();
    signals.handle().close();
    let stopped = running.shutdown().await;
    let _ = supervisor.await;
    match gave_up {
        None => stopped,
        Some(why) => Err(anyhow::anyhow!(
            "the queue's storage failed ({why}); exiting for a restart"
        )),
    }
}

/// How long writes to the disk may keep failing before the daemon exits for a restart: sled
/// 0.34 keeps failing after one failed write even once the disk has room again, and only a
/// new process reopens it. Long enough for a full disk to be freed meanwhile.
pub const STORAGE_GIVE_UP: Duration = Duration::from_secs(10);

/// Completes once the queue's storage has been failing for `STORAGE_GIVE_UP`, with why.
async fn storage_gave_up(queue: &std::sync::Arc<crate::queue::Queue>) -> String {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if queue.storage_failure().is_some() {
            let q = std::sync::Arc::clone(queue);
            let _ = tokio::task::spawn_blocking(move || q.probe_storage()).await;
        }
        if let Some((since, why)) = queue.storage_failure() {
            if since.elapsed() >= STORAGE_GIVE_UP {
                return why;
            }
        }
    }
}

/// One operator request on the queue, answered the same way by the daemon and locally.
#[derive(Debug, Clone)]
pub enum QueueOp {
    Stats,
    Peek(usize),
    Dead(usize),
    RetryDead(Selection),
    PurgeDead(Selection),
}

impl QueueOp {
    pub fn from_cli(command: QueueCommand) -> (QueueOp, bool) {
        let selection = |w: Which| {
            if w.all {
                Selection::All
            } else {
                Selection::Ids(w.ids)
            }
        };
        match command {
            QueueCommand::Stats { json } => (QueueOp::Stats, json),
            QueueCommand::Peek { limit, json } => (QueueOp::Peek(limit), json),
            QueueCommand::Dead { limit, json } => (QueueOp::Dead(limit), json),
            QueueCommand::RetryDead { which, json } => (QueueOp::RetryDead(selection(which)), json),
            QueueCommand::PurgeDead { which, json } => (QueueOp::PurgeDead(selection(which)), json),
        }
    }
}

/// Runs a queue command: through the running daemon if it holds the database, else on the
/// database directly; if neither is possible, says why for both.
pub async fn queue(config: Config, op: QueueOp, json: bool) -> anyhow::Result<()> {
    if !config.data_dir.join("queue").exists() {
        bail!(
            "no queue in {} (data_dir): the daemon has never run with this configuration",
            config.data_dir.display()
        );
    }
    let answer = match Target::open(&config).await? {
        Target::Database(queue) => local(queue.as_ref(), &config, &op).await?,
        Target::Daemon(daemon) => remote(&daemon, &op).await.with_context(|| {
            format!(
                "{}, and the running daemon's admin API did not answer",
                daemon.locked
            )
        })?,
    };
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&answer)?)?;
    } else {
        match op {
            QueueOp::Stats => print_stats_table(&mut out, &answer)?,
            QueueOp::Peek(_) | QueueOp::Dead(_) => print_records(&mut out, &answer)?,
            QueueOp::RetryDead(_) | QueueOp::PurgeDead(_) => print_report(&mut out, &answer)?,
        }
    }
    Ok(())
}

/// Runs the operation on the database, opened by this process (the daemon is stopped).
async fn local(queue: &dyn Backend, config: &Config, op: &QueueOp) -> anyhow::Result<Value> {
    let policy = &config.update_existing_only;
    let mut answer = match op {
        QueueOp::Stats => json!({ "queue": queue.stats()? }),
        QueueOp::Peek(limit) => json!({ "records": with_objects(queue.peek(*limit)?, policy) }),
        QueueOp::Dead(limit) => json!({ "records": with_objects(queue.dead(*limit)?, policy) }),
        QueueOp::RetryDead(sel) => json!({ "report": queue.retry_dead(sel).await? }),
        QueueOp::PurgeDead(sel) => json!({ "report": queue.purge_dead(sel).await? }),
    };
    answer["source"] = "database".into();
    Ok(answer)
}

/// Asks the running daemon over its admin API.
async fn remote(daemon: &Daemon, op: &QueueOp) -> anyhow::Result<Value> {
    let admin = daemon.admin(Duration::from_secs(30))?;
    let request = match op {
        QueueOp::Stats => admin.get("/stats"),
        QueueOp::Peek(limit) => admin.get(&format!("/peek?limit={limit}")),
        QueueOp::Dead(limit) => admin.get(&format!("/dead?limit={limit}")),
        QueueOp::RetryDead(sel) => admin.post("/retry-dead").json(sel),
        QueueOp::PurgeDead(sel) => admin.post("/purge-dead").json(sel),
    };
    let place = &admin.place;
    let response = request
        .send()
        .await
        .with_context(|| format!("{place} is unreachable"))?;
    let status = response.status();
    if !status.is_success() {
        let body = response.text().await.unwrap_or_default();
        bail!("{place} answered {status}: {}", body.trim());
    }
    let mut v: Value = response.json().await?;
    v["source"] = "daemon".into();
    Ok(v)
}

fn print_stats_table(out: &mut impl Write, v: &Value) -> std::io::Result<()> {
    let q = &v["queue"];
    let n = |k: &str| q[k].as_u64().unwrap_or(0);
    writeln!(out, "pending            {}", n("pending"))?;
    writeln!(out, "  events           {}", n("pending_events"))?;
    writeln!(
        out,
        "  attributes       {}  (memberships included)",
        n("pending_attributes")
    )?;
    writeln!(out, "in flight          {}", n("in_flight"))?;
    writeln!(out, "dead-lettered      {}", n("dead"))?;
    writeln!(
        out,
        "skipped unchanged  {}  (Braze already had the value)",
        n("skipped_unchanged_total")
    )?;
    let age = q["oldest_pending_age_ms"].as_u64().map_or("-".into(), age);
    writeln!(out, "oldest pending     {age}")?;
    writeln!(out, "bytes on disk      {}", n("disk_bytes"))?;
    if n("lost_total") > 0 {
        writeln!(
            out,
            "given up as lost   {}  (at most; damaged files accepted with run --accept-loss)",
            n("lost_total")
        )?;
    }
    if let Some(d) = v.get("delivery") {
        writeln!(
            out,
            "delivery           {}",
            d["health"]["state"].as_str().unwrap_or("?")
        )?;
        if let Some(reason) = d["health"]["reason"].as_str() {
            writeln!(out, "  reason           {reason}")?;
        }
    }
    writeln!(
        out,
        "source             {}",
        v["source"].as_str().unwrap_or("?")
    )
}

/// A duration for people: 850ms, 12.4s, 7m, 3h, 2d.
fn age(ms: u64) -> String {
    match ms {
        0..1_000 => format!("{ms}ms"),
        1_000..60_000 => format!("{:.1}s", ms as f64 / 1000.0),
        60_000..3_600_000 => format!("{}m", ms / 60_000),
        3_600_000..86_400_000 => format!("{}h", ms / 3_600_000),
        _ => format!("{}d", ms / 86_400_000),
    }
}

/// A Braze object's short form for the table (`--json` has it whole): what it carries
/// besides the identifier, the flags and an event's name and time (already in WHAT), cut to
/// 80 characters.
fn short(object: &Value) -> String {
    let Some(fields) = object.as_object() else {
        return String::new();
    };
    let skip = ["external_id", "braze_id", "user_alias", "name", "time"];
    let rest: serde_json::Map<String, Value> = fields
        .iter()
        .filter(|(k, _)| !k.starts_with('_') && !skip.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let text = Value::Object(rest).to_string();
    match text.char_indices().nth(80) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text,
    }
}

fn print_records(out: &mut impl Write, v: &Value) -> std::io::Result<()> {
    let empty = Vec::new();
    let records = v["records"].as_array().unwrap_or(&empty);
    if records.is_empty() {
        return writeln!(out, "no records ({})", v["source"].as_str().unwrap_or("?"));
    }
    let dead = records.iter().any(|r| r.get("reason").is_some());
    write!(
        out,
        "{:>10}  {:<10}  {:<28}  {:>7}  {:>8}  {:<36}",
        "ID", "KIND", "USER", "AGE", "ATTEMPTS", "WHAT"
    )?;
    writeln!(out, "{}", if dead { "  REASON  OBJECT" } else { "" })?;
    for r in records {
        let s = |k: &str| r[k].as_str().unwrap_or("").to_string();
        let flight = if r["in_flight"].as_bool() == Some(true) {
            "*"
        } else {
            ""
        };
        write!(
            out,
            "{:>10}  {:<10}  {:<28}  {:>7}  {:>8}  {:<36}",
            format!("{}{flight}", r["id"]),
            s("kind"),
            s("user"),
            age(r["age_ms"].as_u64().unwrap_or(0)),
            r["attempts"].as_u64().unwrap_or(0),
            s("what"),
        )?;
        writeln!(
            out,
            "{}",
            if dead {
                format!("  {}  {}", s("reason"), short(&r["object"]))
            } else {
                String::new()
            }
        )?;
    }
    writeln!(
        out,
        "{} records ({}; * = being sent now)",
        records.len(),
        v["source"].as_str().unwrap_or("?")
    )
}

fn print_report(out: &mut impl Write, v: &Value) -> std::io::Result<()> {
    let report = &v["report"];
    for (key, meaning) in [
        ("retried", "put back in the queue"),
        (
            "superseded",
            "dropped: a newer update of the same user and attribute was accepted since",
        ),
        ("purged", "deleted"),
        ("missing", "not in the dead letters"),
        (
            "undecodable",
            "left in place: the stored bytes no longer decode",
        ),
    ] {
        if let Some(ids) = report[key].as_array() {
            if !ids.is_empty() || key == "retried" || key == "purged" {
                let list: Vec<String> = ids.iter().take(20).map(|i| i.to_string()).collect();
                let more = if ids.len() > 20 { " ..." } else { "" };
                writeln!(
                    out,
                    "{:<11} {:>6}  {meaning}  {}{more}",
                    key,
                    ids.len(),
                    list.join(" ")
                )?;
            }
        }
    }
    Ok(())
}
