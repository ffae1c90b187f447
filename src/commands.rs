//! What each command does. Errors carry context here (anyhow); `main` prints them once.

use std::io::Write;
use std::time::Duration;

use anyhow::{bail, Context};
use futures_util::StreamExt;
use serde_json::Value;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook_tokio::Signals;

use crate::config::Config;
use crate::daemon;
use crate::queue::{Queue, QueueError};

/// Exit codes, so scripts can tell a bad setup from a failure at run time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitCode {
    Ok = 0,
    Failure = 1,
    BadConfig = 2,
}

pub async fn run(config: Config) -> anyhow::Result<()> {
    let mut signals = Signals::new([SIGTERM, SIGINT]).context("cannot install signal handlers")?;
    let listener = tokio::net::TcpListener::bind(config.ingest.listen)
        .await
        .with_context(|| format!("cannot listen on {} (ingest.listen)", config.ingest.listen))?;
    let running = daemon::start(&config, listener).await?;
    // Only now is the database open and the listener bound: systemd may send traffic.
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    let signal = signals.next().await;
    tracing::info!(signal = ?signal, "stopping: ingest first, then delivery, then a final sync");
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    signals.handle().close();
    running.shutdown().await
}

pub async fn queue_stats(config: Config, json: bool) -> anyhow::Result<()> {
    let stats = match local_stats(&config).await {
        Ok(v) => v,
        Err(LocalError::Locked(local)) => daemon_stats(&config).await.with_context(|| {
            format!("{local}, and the running daemon's admin API did not answer")
        })?,
        Err(LocalError::Other(e)) => return Err(e),
    };
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&stats)?)?;
    } else {
        print_stats_table(&mut out, &stats)?;
    }
    Ok(())
}

enum LocalError {
    Locked(QueueError),
    Other(anyhow::Error),
}

/// Opens the database directly (the daemon is not running).
async fn local_stats(config: &Config) -> Result<Value, LocalError> {
    if !config.data_dir.join("queue").exists() {
        return Err(LocalError::Other(anyhow::anyhow!(
            "no queue in {} (data_dir): the daemon has never run with this configuration",
            config.data_dir.display()
        )));
    }
    let data_dir = config.data_dir.clone();
    let settings = daemon::queue_settings(config);
    let opened = tokio::task::spawn_blocking(move || Queue::open(&data_dir, settings))
        .await
        .map_err(|e| LocalError::Other(e.into()))?;
    let queue = match opened {
        Ok(q) => q,
        Err(e @ QueueError::Locked { .. }) => return Err(LocalError::Locked(e)),
        Err(e) => return Err(LocalError::Other(e.into())),
    };
    let stats = queue.stats().map_err(|e| LocalError::Other(e.into()))?;
    Ok(serde_json::json!({"queue": stats, "source": "database"}))
}

/// Asks the running daemon over its admin API, with the ingest token.
async fn daemon_stats(config: &Config) -> anyhow::Result<Value> {
    let mut addr = config.ingest.listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let url = format!("http://{addr}/v1/admin/queue/stats");
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let mut req = client.get(&url);
    if let Some(t) = &config.ingest.token {
        req = req.bearer_auth(t.expose());
    }
    let resp = req.send().await.with_context(|| format!("GET {url}"))?;
    if !resp.status().is_success() {
        bail!("GET {url} answered {}", resp.status());
    }
    let mut v: Value = resp.json().await?;
    v["source"] = "daemon".into();
    Ok(v)
}

fn print_stats_table(out: &mut impl Write, v: &Value) -> std::io::Result<()> {
    let q = &v["queue"];
    let n = |k: &str| q[k].as_u64().unwrap_or(0);
    writeln!(out, "pending            {}", n("pending"))?;
    writeln!(out, "  events           {}", n("pending_events"))?;
    writeln!(out, "  memberships      {}", n("pending_memberships"))?;
    writeln!(out, "in flight          {}", n("in_flight"))?;
    writeln!(out, "dead-lettered      {}", n("dead"))?;
    let age = match q["oldest_pending_age_ms"].as_u64() {
        Some(ms) => format!("{:.1}s", ms as f64 / 1000.0),
        None => "-".into(),
    };
    writeln!(out, "oldest pending     {age}")?;
    writeln!(out, "bytes on disk      {}", n("disk_bytes"))?;
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
