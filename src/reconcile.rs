//! `reconcile`: what Braze holds for a split's members, against what the daemon says they
//! are, and with `--repair` the right value queued again for each one that differs.
//!
//! The members are those of the split's last complete snapshot (`PUT …/members` or
//! `import snapshot`), read from its file. Braze is asked through `/users/export/ids`, at most
//! 50 `external_id`s a call, one call at a time, waiting out a 429 or a spent
//! `X-RateLimit-Remaining` until the window resets (the endpoint has a limit of its own, 250
//! calls a minute on newer workspaces; both limits:
//! <https://www.braze.com/docs/api/endpoints/export/user_data/post_users_identifier>).
//! Each member should hold `AIQ_<audience>_<split>: true`; one differs when Braze has no
//! profile for it, the attribute is missing, or it holds another value. Members known by
//! `braze_id` alone cannot be looked up in bulk and are counted as not checked. Who left the
//! split is not checked: the snapshot no longer names them.
//!
//! A repair queues `true` for each differing member past the skip of unchanged values
//! (`delivery.skip_unchanged_for_s`): through the running daemon (`POST
//! /v1/memberships?resend=true`), or straight into the database when the daemon is stopped.
//! Without `--repair` it only reads: it never queues anything.

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;
use serde_json::{json, Value};

use crate::braze::client::{BrazeClient, ExportOutcome};
use crate::config::Config;
use crate::record::{Membership, Record, UserId};
use crate::snapshot::SnapshotMembers;
use crate::target::{Daemon, Target};

/// Braze's limit of `external_ids` per `/users/export/ids` call (see the module doc).
const IDS_PER_CALL: usize = 50;
/// How long a lookup may keep failing with 429s and 5xx before reconcile gives up.
const GIVE_UP_AFTER: Duration = Duration::from_secs(600);

pub struct Options {
    pub audience: String,
    pub split: String,
    pub repair: bool,
    pub json: bool,
}

/// One member whose attribute in Braze is not what the daemon says.
#[derive(Debug, Clone, Serialize)]
pub struct Drift {
    pub external_id: String,
    /// `"no profile"`, `"attribute missing"`, or `"holds <value>"`.
    pub found: String,
}

#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub audience: String,
    pub split: String,
    pub attribute: String,
    pub members: u64,
    pub checked: u64,
    /// Members known by `braze_id` alone.
    pub not_checked: u64,
    pub drift: Vec<Drift>,
    /// Repairs queued (with `--repair`); `None` without it.
    pub repaired: Option<u64>,
}

/// Drift found and left as it is: exit 1.
#[derive(Debug)]
pub struct Unrepaired(pub usize);

impl std::fmt::Display for Unrepaired {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} members differ in Braze; run again with --repair to queue their value",
            self.0
        )
    }
}

impl std::error::Error for Unrepaired {}

pub async fn run(config: &Config, options: Options) -> anyhow::Result<()> {
    let Options {
        audience,
        split,
        repair,
        json,
    } = options;
    crate::ingest::check_id_part(&audience).map_err(|e| anyhow::anyhow!("--audience: {e}"))?;
    crate::ingest::check_id_part(&split).map_err(|e| anyhow::anyhow!("--split: {e}"))?;
    let members = SnapshotMembers::open(&config.data_dir, &audience, &split)?
        .with_context(|| {
            format!(
                "no snapshot of audience {audience} split {split} in {}: reconcile checks the \
                 members of the last snapshot uploaded (PUT /v1/audiences/{audience}/splits/{split}/members)",
                config.data_dir.display()
            )
        })?;
    let client = BrazeClient::new(&config.braze)?;
    let attribute = format!("AIQ_{audience}_{split}");
    let mut report = Report {
        audience: audience.clone(),
        split: split.clone(),
        attribute: attribute.clone(),
        members: members.count,
        ..Report::default()
    };
    let mut progress = Progress::new(members.count);
    let mut batch = Vec::with_capacity(IDS_PER_CALL);
    let mut members = members;
    loop {
        let next = members.next().transpose()?;
        let end = next.is_none();
        match next {
            Some(UserId::External(id)) => batch.push(id),
            Some(_) => report.not_checked += 1,
            None => {}
        }
        if batch.len() == IDS_PER_CALL || (end && !batch.is_empty()) {
            let found = lookup(&client, &batch).await?;
            report.checked += batch.len() as u64;
            report.drift.extend(compare(&batch, &found, &attribute));
            batch.clear();
            progress.show(report.checked + report.not_checked, report.drift.len());
        }
        if end {
            break;
        }
    }
    progress.done();
    if repair && !report.drift.is_empty() {
        let ids: Vec<String> = report.drift.iter().map(|d| d.external_id.clone()).collect();
        queue_repairs(config, &audience, &split, &ids).await?;
        report.repaired = Some(ids.len() as u64);
    }
    print(&report, json)?;
    match (report.drift.len(), report.repaired) {
        (0, _) | (_, Some(_)) => Ok(()),
        (n, None) => Err(Unrepaired(n).into()),
    }
}

/// What Braze holds for these ids: their `custom_attributes`, or no entry for no profile.
async fn lookup(
    client: &BrazeClient,
    ids: &[String],
) -> anyhow::Result<std::collections::HashMap<String, Value>> {
    let started = Instant::now();
    let mut wait = Duration::from_millis(500);
    loop {
        match client.export_ids(ids).await {
            ExportOutcome::Found { users, rate, .. } => {
                // The window's calls are spent: wait for it to reset rather than earn a 429.
                if rate.remaining == Some(0) {
                    if let Some(reset) = rate.reset_in {
                        tokio::time::sleep(reset.min(Duration::from_secs(60))).await;
                    }
                }
                return Ok(users
                    .into_iter()
                    .filter_map(|u| {
                        let id = u.get("external_id")?.as_str()?.to_string();
                        Some((
                            id,
                            u.get("custom_attributes").cloned().unwrap_or(Value::Null),
                        ))
                    })
                    .collect());
            }
            ExportOutcome::Retry { reason, after } => {
                if started.elapsed() > GIVE_UP_AFTER {
                    bail!(
                        "Braze kept answering {reason} for {} s; giving up",
                        GIVE_UP_AFTER.as_secs()
                    );
                }
                let pause = after.unwrap_or(wait).min(Duration::from_secs(60));
                tracing::info!(%reason, pause_ms = pause.as_millis() as u64, "export lookup will be retried");
                tokio::time::sleep(pause).await;
                wait = (wait * 2).min(Duration::from_secs(30));
            }
            ExportOutcome::Failed(outcome) => {
                let outcome = crate::check::outcome_of(&outcome);
                return Err(anyhow::Error::new(crate::check::Failed(outcome))
                    .context("Braze refused the /users/export/ids lookup"));
            }
        }
    }
}

/// The members of `ids` whose `attribute` is not `true` in `found`.
fn compare(
    ids: &[String],
    found: &std::collections::HashMap<String, Value>,
    attribute: &str,
) -> Vec<Drift> {
    ids.iter()
        .filter_map(|id| {
            let what = match found.get(id) {
                None => "no profile".to_string(),
                Some(attributes) => match attributes.get(attribute) {
                    None | Some(Value::Null) => "attribute missing".to_string(),
                    Some(Value::Bool(true)) => return None,
                    Some(other) => format!("holds {other}"),
                },
            };
            Some(Drift {
                external_id: id.clone(),
                found: what,
            })
        })
        .collect()
}

/// Queues `true` for each id, past the skip of unchanged values: into the database when the
/// daemon is stopped, else through it.
async fn queue_repairs(
    config: &Config,
    audience: &str,
    split: &str,
    ids: &[String],
) -> anyhow::Result<()> {
    let records: Vec<Record> = ids
        .iter()
        .map(|id| {
            Record::Membership(Membership {
                user: UserId::External(id.clone()),
                audience_id: audience.to_string(),
                split_id: split.to_string(),
                member: true,
                time: None,
            })
        })
        .collect();
    match Target::open(config).await? {
        Target::Database(queue) => {
            for chunk in records.chunks(10_000) {
                queue.enqueue_with(chunk.to_vec(), false).await?;
            }
            Ok(())
        }
        Target::Daemon(daemon) => through_daemon(&daemon, ids, audience, split).await,
    }
}

async fn through_daemon(
    daemon: &Daemon,
    ids: &[String],
    audience: &str,
    split: &str,
) -> anyhow::Result<()> {
    let url = daemon.url("/v1/memberships?resend=true");
    let client = daemon.client(Some(Duration::from_secs(60)))?;
    for chunk in ids.chunks(10_000) {
        let body: Vec<Value> = chunk
            .iter()
            .map(|id| json!({"audience_id": audience, "split_id": split, "external_id": id, "member": true}))
            .collect();
        let request = daemon.authorized(client.post(&url).json(&body));
        let response = request.send().await.with_context(|| {
            format!("the database is locked by the running daemon, and {url} is unreachable")
        })?;
        if !response.status().is_success() {
            let status = response.status();
            bail!(
                "{url} answered {status}: {}",
                response.text().await.unwrap_or_default().trim()
            );
        }
    }
    Ok(())
}

/// A progress line on stderr, at most once a second.
struct Progress {
    total: u64,
    shown: Option<Instant>,
}

impl Progress {
    fn new(total: u64) -> Progress {
        Progress { total, shown: None }
    }

    fn show(&mut self, done: u64, drift: usize) {
        if self
            .shown
            .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
        {
            return;
        }
        self.shown = Some(Instant::now());
        eprint!(
            "\rreconcile: {done} of {} members looked up, {drift} differ",
            self.total
        );
    }

    fn done(&self) {
        if self.shown.is_some() {
            eprintln!();
        }
    }
}

fn print(report: &Report, json: bool) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
        return writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(report).unwrap_or_default()
        );
    }
    writeln!(
        out,
        "{}: {} members in the last snapshot, {} looked up in Braze, {} not checked (braze_id only)",
        report.attribute, report.members, report.checked, report.not_checked
    )?;
    for d in report.drift.iter().take(50) {
        writeln!(out, "  {:<40}  {}", d.external_id, d.found)?;
    }
    if report.drift.len() > 50 {
        writeln!(
            out,
            "  ... and {} more (--json lists all)",
            report.drift.len() - 50
        )?;
    }
    match report.repaired {
        Some(n) => writeln!(out, "{} differ; {n} repairs queued", report.drift.len()),
        None if report.drift.is_empty() => writeln!(out, "no drift: Braze holds what it was sent"),
        None => writeln!(
            out,
            "{} differ; --repair queues their value",
            report.drift.len()
        ),
    }
}
