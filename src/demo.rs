//! `demo`: the whole pipeline on one machine, with nothing to set up.
//!
//! A fake Braze on loopback, the real daemon (real sled queue in a temporary directory, real
//! HTTP), the sample ActionIQ exports from `data/`, a Braze outage in the middle so the
//! retries show, progress while the queue drains, and a summary of what "Braze" holds. The
//! demo never reaches a real Braze, and never touches a configured `data_dir`: its queue is
//! removed when it ends.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::config::Config;
use crate::daemon;
use fake_braze::{Behaviour, FakeBraze};

const DEMO_KEY: &str = "demo-api-key";
/// Records per ingest request, as an ActionIQ export job would batch them.
const REQUEST_RECORDS: usize = 250;

pub async fn run(data: &Path, outage: Duration) -> anyhow::Result<()> {
    let sample = |name: &str, kind| {
        let path = data.join(name);
        if !path.exists() {
            bail!(
                "cannot find the sample data {} (run from the checkout, or pass --data DIR)",
                path.display()
            );
        }
        crate::import::export_as_ndjson(&path, kind)
    };
    // An ActionIQ audience export (CSV) and a stream of events (NDJSON).
    let memberships = sample("audience_export.csv", crate::import::Kind::Memberships)?;
    let events = sample("events.ndjson", crate::import::Kind::Events)?;
    let work = std::env::temp_dir().join(format!("aiq-braze-sync-demo-{}", std::process::id()));
    let result = demo(&work, &memberships, &events, outage).await;
    let _ = std::fs::remove_dir_all(&work);
    result
}

async fn demo(
    work: &Path,
    memberships: &[String],
    events: &[String],
    outage: Duration,
) -> anyhow::Result<()> {
    let fake = FakeBraze::start(DEMO_KEY)
        .await
        .context("cannot start the fake Braze")?;
    let mut config = Config::for_local(work.join("data"), fake.url(), DEMO_KEY);
    config.delivery.backoff_initial = Duration::from_millis(200);
    config.delivery.backoff_max = Duration::from_secs(2);
    // The stand-in starts with no profiles and, like Braze, applies an update-only write to
    // no one it has not seen; here memberships may create the profiles they describe.
    config.update_existing_only.memberships = false;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let running = daemon::start(&config, listener).await?;
    let base = format!("http://{}", running.addr);
    println!(
        "fake Braze      {}  (checks auth, 75 objects per request, one id per object)",
        fake.url()
    );
    println!(
        "aiq-braze-sync  {base}  (queue in {})",
        config.data_dir.display()
    );

    let started = Instant::now();
    if !outage.is_zero() {
        fake.set_behaviour(Behaviour::FailStatus {
            status: 503,
            until: Instant::now() + outage,
        });
        println!(
            "Braze is down (503) for the first {:.0} s: everything accepted waits on disk",
            outage.as_secs_f64()
        );
    }
    let client = reqwest::Client::new();
    let mut accepted = 0usize;
    for (path, lines) in [("/v1/memberships", memberships), ("/v1/events", events)] {
        for chunk in lines.chunks(REQUEST_RECORDS) {
            let body = chunk.join("\n");
            let r = client
                .post(format!("{base}{path}"))
                .body(body)
                .send()
                .await?;
            if r.status().as_u16() != 202 {
                bail!(
                    "{path} answered {}: {}",
                    r.status(),
                    r.text().await.unwrap_or_default()
                );
            }
            accepted += chunk.len();
        }
    }
    println!(
        "accepted {accepted} records ({} memberships from data/audience_export.csv, {} events from data/events.ndjson), each durable before its 202",
        memberships.len(),
        events.len()
    );

    let terminal = std::io::stdout().is_terminal();
    loop {
        let q = running.queue.stats()?;
        let d = running.delivery.stats();
        let line = format!(
            "pending {:>6}   delivered {:>6}   dead {:>3}   Braze requests {:>4} ok / {:>3} failed   [{}]",
            q.pending, d.records_delivered, q.dead, d.requests_accepted, d.requests_failed,
            serde_json::to_value(&d.health)?["state"].as_str().unwrap_or("?")
        );
        if terminal {
            print!("\r{line}");
            std::io::stdout().flush()?;
        } else {
            println!("{line}");
        }
        if q.pending == 0 && q.in_flight == 0 {
            break;
        }
        if started.elapsed() > Duration::from_secs(120) {
            bail!("the queue did not drain within 2 minutes");
        }
        tokio::time::sleep(Duration::from_millis(if terminal { 200 } else { 1000 })).await;
    }
    if terminal {
        println!();
    }
    let stats = running.queue.stats()?;
    running.shutdown().await?;
    summary(&fake, &stats, started.elapsed());
    Ok(())
}

fn summary(fake: &FakeBraze, stats: &crate::queue::Stats, took: Duration) {
    let requests = fake.requests();
    let ok = requests.iter().filter(|r| r.status / 100 == 2).count();
    let biggest = requests.iter().map(|r| r.objects).max().unwrap_or(0);
    let state = fake.attribute_state();
    let mut per_attribute: BTreeMap<&str, (usize, usize)> = BTreeMap::new();
    for ((_, attr), value) in &state {
        let e = per_attribute.entry(attr.as_str()).or_default();
        if value.as_bool() == Some(true) {
            e.0 += 1;
        } else {
            e.1 += 1;
        }
    }
    let mut by_name: BTreeMap<String, usize> = BTreeMap::new();
    for e in fake.events() {
        *by_name
            .entry(e["name"].as_str().unwrap_or("?").to_owned())
            .or_default() += 1;
    }
    println!("\nWhat Braze received ({:.1} s):", took.as_secs_f64());
    println!("  requests        {} ({ok} accepted, {} refused during the outage), at most {biggest} objects each", requests.len(), requests.len() - ok);
    if stats.coalesced_total > 0 {
        println!(
            "  coalesced       {} membership updates replaced by a newer one before sending",
            stats.coalesced_total
        );
    }
    for (attr, (members, non)) in &per_attribute {
        println!("  {attr:<15} true for {members} users, false for {non}");
    }
    for (name, n) in &by_name {
        println!("  event {name:<15} {n}");
    }
    println!("  dead letters    {}", stats.dead);
}
