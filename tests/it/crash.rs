use std::collections::HashSet;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fake_braze::FakeBraze;
use serde_json::json;

use crate::binary::*;
use crate::common::*;

/// What the writers were told was accepted (a 2xx), by kind.
#[derive(Default)]
struct Acked {
    events: HashSet<u64>,
    members: HashSet<u64>,
    relayed: HashSet<u64>,
    /// Events for users the fake Braze refuses: they must end in the dead letters.
    refused: HashSet<u64>,
    /// Per "hot" user, the last `score` a writer had acknowledged.
    scores: std::collections::HashMap<String, u64>,
}

/// One writer's next request: mostly events, some memberships, Braze-shaped relay bodies,
/// events Braze will refuse, and a stream of `score` values for the writer's own hot users
/// (one writer per user, so "last accepted" is well defined).
fn next_request(w: u64, n: u64) -> (&'static str, String, Vec<u64>) {
    let first = (w << 32) | n;
    let ids: Vec<u64> = (first..first + 50).collect();
    match n % 400 {
        100 => {
            let items: Vec<_> = ids
                .iter()
                .map(|i| membership(&format!("m{i}"), "crash", "1", true))
                .collect();
            ("/v1/memberships", array(&items), ids)
        }
        150 => {
            let attributes: Vec<_> = ids
                .iter()
                .map(|i| json!({"external_id": format!("r{i}"), "relayed": i}))
                .collect();
            let events: Vec<_> = ids
                .iter()
                .map(|i| {
                    json!({"external_id": format!("r{i}"), "name": "relayed",
                                "time": "2026-11-28T10:00:00Z", "properties": {"rid": i}})
                })
                .collect();
            let body = json!({"attributes": attributes, "events": events});
            ("/users/track", body.to_string(), ids)
        }
        250 => {
            let items: Vec<_> = ids
                .iter()
                .map(|&i| {
                    let mut e = event(i);
                    e["external_id"] = json!(format!("refused-{i}"));
                    e
                })
                .collect();
            ("refused", array(&items), ids)
        }
        _ if n % 100 == 50 => {
            let items: Vec<_> = (0..5)
                .map(|u| json!({"external_id": format!("hot-{w}-{u}"), "attributes": {"score": n}}))
                .collect();
            ("/v1/attributes", array(&items), vec![n])
        }
        _ => {
            let items: Vec<_> = ids.iter().map(|&i| event(i)).collect();
            ("/v1/events", array(&items), ids)
        }
    }
}

/// Crash torture: the real binary under concurrent ingest from four clients and under
/// delivery is killed with SIGKILL at random moments, for `TORTURE_CYCLES` cycles (3 by
/// default; `TORTURE_CYCLES=100 cargo test --release torture` by hand). Each cycle kills it in
/// one of four situations: plain traffic, a Braze outage, a snapshot upload in flight, a
/// dead-letter retry in flight. After every restart the database opens; at the end every
/// record that got a 2xx is at the fake Braze (or, for users Braze refuses, in the dead
/// letters), every attribute ends at its last accepted value, and duplicates are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torture_no_acknowledged_record_is_lost_across_sigkills() {
    use fake_braze::Behaviour;
    let cycles: u32 = std::env::var("TORTURE_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let dir = tempfile::tempdir().unwrap();
    let (fake, mut daemon, port, base, client) = start_binary(dir.path()).await;

    let acked: Arc<Mutex<Acked>> = Default::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..4u64 {
        let (client, base, stop, acked) =
            (client.clone(), base.clone(), stop.clone(), acked.clone());
        let fake = fake.clone();
        writers.push(tokio::spawn(async move {
            let mut n = 0u64;
            // After the stop, one last acknowledged score per hot user, so the final value
            // is known exactly.
            let mut final_scores = false;
            loop {
                let stopping = stop.load(std::sync::atomic::Ordering::Relaxed);
                if stopping && final_scores {
                    break;
                }
                let (kind, body, ids) = if stopping {
                    let items: Vec<_> = (0..5)
                        .map(|u| json!({"external_id": format!("hot-{w}-{u}"), "attributes": {"score": n}}))
                        .collect();
                    ("/v1/attributes", array(&items), vec![n])
                } else {
                    next_request(w, n)
                };
                let path = if kind == "refused" {
                    // Braze refuses these users' objects on their own (a blocklisted id).
                    fake.reject_ids(ids.iter().map(|i| format!("refused-{i}")));
                    "/v1/events"
                } else {
                    kind
                };
                let sent = client
                    .post(format!("{base}{path}"))
                    .bearer_auth(TOKEN)
                    .body(body)
                    .send()
                    .await;
                match sent {
                    Ok(r) if r.status().is_success() => {
                        let mut a = acked.lock().unwrap();
                        match kind {
                            "/v1/events" => a.events.extend(ids),
                            "/users/track" => a.relayed.extend(ids),
                            "/v1/memberships" => a.members.extend(ids),
                            "refused" => a.refused.extend(ids),
                            _ => {
                                for u in 0..5 {
                                    a.scores.insert(format!("hot-{w}-{u}"), ids[0]);
                                }
                                final_scores |= stopping;
                            }
                        }
                        n += 50;
                    }
                    // Refused, reset, daemon down or stopping: not acknowledged, try again.
                    _ => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        }));
    }

    let mut rng = fastrand::Rng::with_seed(0x5eed ^ std::process::id() as u64);
    let members_path = "/v1/audiences/88/splits/1/members";
    let mut situations = Vec::new();
    for cycle in 0..cycles {
        let situation =
            ["traffic", "outage", "snapshot", "retry-dead"][(cycle as usize + rng.usize(0..4)) % 4];
        situations.push(situation);
        tokio::time::sleep(Duration::from_millis(rng.u64(300..1200))).await;
        let mut upload = None;
        match situation {
            "outage" => fake.set_behaviour(Behaviour::FailStatus {
                status: 503,
                until: Instant::now() + Duration::from_millis(rng.u64(200..1500)),
            }),
            "snapshot" => {
                upload = Some(
                    crate::snapshot::half_upload(&format!("127.0.0.1:{port}"), members_path, 5_000)
                        .await,
                );
            }
            "retry-dead" => {
                let config = daemon.config.clone();
                std::thread::spawn(move || {
                    let _ = Command::new(env!("CARGO_BIN_EXE_aiq-braze-sync"))
                        .args([
                            "--config",
                            config.to_str().unwrap(),
                            "queue",
                            "retry-dead",
                            "--all",
                        ])
                        .output();
                });
            }
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(rng.u64(0..200))).await;
        daemon.kill9();
        drop(upload);
        tokio::time::sleep(Duration::from_millis(rng.u64(50..300))).await;
        daemon.spawn();
        daemon.until_healthy(&client, &base).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    // A snapshot upload killed mid-way left the split usable: a whole upload now succeeds.
    let members: Vec<String> = (0..100).map(|i| format!("snap-{i}")).collect();
    let (status, v) = crate::snapshot::put(
        &base,
        members_path,
        crate::snapshot::ndjson(members),
        "application/x-ndjson",
    )
    .await;
    assert_eq!(status, 200, "{v}");

    // The writers are done: take what they recorded.
    let a = std::mem::take(&mut *acked.lock().unwrap());
    assert!(
        a.events.len() > 1000,
        "too little was acknowledged to mean anything: {}",
        a.events.len()
    );
    let missing = |fake: &FakeBraze| {
        let got = event_counts(fake);
        let held = fake.attribute_state();
        let mut missing: Vec<String> = Vec::new();
        missing.extend(
            a.events
                .iter()
                .filter(|i| !got.contains_key(i))
                .map(|i| format!("event {i}")),
        );
        missing.extend(
            a.members
                .iter()
                .filter(|i| {
                    held.get(&(format!("external_id:m{i}"), "AIQ_crash_1".to_string()))
                        != Some(&json!(true))
                })
                .map(|i| format!("membership m{i}")),
        );
        let relayed_events: HashSet<u64> = fake
            .events()
            .iter()
            .filter_map(|e| e["properties"]["rid"].as_u64())
            .collect();
        missing.extend(
            a.relayed
                .iter()
                .filter(|&&i| {
                    !relayed_events.contains(&i)
                        || held.get(&(format!("external_id:r{i}"), "relayed".to_string()))
                            != Some(&json!(i))
                })
                .map(|i| format!("relayed {i}")),
        );
        missing.extend(
            a.scores
                .iter()
                .filter(|(u, score)| {
                    held.get(&(format!("external_id:{u}"), "score".to_string()))
                        != Some(&json!(score))
                })
                .map(|(u, score)| {
                    format!(
                        "{u} score {score}: Braze has {:?}",
                        held.get(&(format!("external_id:{u}"), "score".to_string()))
                    )
                }),
        );
        (missing, got)
    };
    // First wait for the queue to drain, which is cheap to ask (counting at the fake is
    // not, at hundreds of thousands of records, and would slow the very delivery it waits
    // for). Then what the fake lacks is lost, not late.
    let config = daemon.config.clone();
    let drained = wait_until(Duration::from_secs(600), || {
        let s = cli_json(&config, &["queue", "stats", "--json"]);
        s["queue"]["pending"] == 0 && s["queue"]["in_flight"] == 0
    })
    .await;
    let fake2 = fake.clone();
    let complete =
        drained && wait_until(Duration::from_secs(30), || missing(&fake2).0.is_empty()).await;
    let (missing_now, got) = missing(&fake);
    let duplicates: usize = got.values().map(|n| n - 1).sum();
    eprintln!(
        "torture: {cycles} kills ({situations:?}), {} starts; acknowledged {} events, {} memberships, \
         {} relayed attribute+event pairs, {} refused events, {} hot scores; {duplicates} duplicate events; {} missing",
        daemon.starts,
        a.events.len(),
        a.members.len(),
        a.relayed.len(),
        a.refused.len(),
        a.scores.len(),
        missing_now.len()
    );
    assert!(
        drained,
        "the queue did not drain in 600 s: {}",
        cli_json(&daemon.config, &["queue", "stats", "--json"])
    );
    assert!(
        complete,
        "lost acknowledged records: {:?}; log: {}",
        &missing_now[..missing_now.len().min(20)],
        std::fs::read_to_string(&daemon.log).unwrap_or_default()
    );
    // Records Braze refuses are not dropped: every refused event is in the dead letters
    // (a retry in flight at a kill may have put some back; they return there). The queue has
    // drained (above); stop the daemon, then list the dead letters from the database itself:
    // the daemon's listing endpoint caps a page at 10,000 records.
    let refused = a.refused.clone();
    drop(a);
    // A clean stop after all that exits 0, as systemd expects.
    assert_eq!(
        daemon.sigterm(),
        0,
        "{}",
        std::fs::read_to_string(&daemon.log).unwrap_or_default()
    );
    let dead: HashSet<String> = cli_json(
        &config,
        &["queue", "dead", "--json", "--limit", "100000000"],
    )["records"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["user"].as_str().map(str::to_string))
        .collect();
    let lost: Vec<_> = refused
        .iter()
        .filter(|i| !dead.contains(&format!("external_id:refused-{i}")))
        .take(20)
        .collect();
    assert!(
        lost.is_empty(),
        "refused records neither delivered nor dead-lettered: {lost:?} ({} dead listed)",
        dead.len()
    );
}

/// A SIGKILL in the middle of a snapshot upload changes nothing: after the restart the next
/// snapshot is diffed against the last complete one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkill_during_a_snapshot_upload_leaves_the_last_complete_snapshot_as_reference() {
    use crate::snapshot::{counts, half_upload, ndjson, put};
    let dir = tempfile::tempdir().unwrap();
    let (_fake, mut daemon, port, base, client) = start_binary(dir.path()).await;
    let path = "/v1/audiences/77/splits/1/members";
    let users: Vec<String> = (0..1000).map(|i| format!("s{i}")).collect();
    let (status, v) = put(&base, path, ndjson(users.clone()), "application/x-ndjson").await;
    assert_eq!((status, counts(&v)), (200, (1000, 0, 0)), "{v}");

    let half = half_upload(&format!("127.0.0.1:{port}"), path, 20_000).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    daemon.kill9();
    drop(half);
    daemon.spawn();
    wait_healthy(&client, &base).await;

    let mut next = users.clone();
    next.push("late".into());
    let (status, v) = put(&base, path, ndjson(next), "application/x-ndjson").await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(counts(&v), (1, 0, 1000), "{v}");
    assert_eq!(daemon.sigterm(), 0);
}

/// What the daemon writes is its owner's alone whatever the caller's umask: the queue holds
/// personal data. Every directory under `data_dir` (and it) is 0700, every file 0600.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_data_directory_is_readable_by_its_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let (_fake, mut daemon, _port, base, client) = start_binary(dir.path()).await;
    let (status, _) = post(&client, &format!("{base}/v1/events"), array(&[event(1)])).await;
    assert_eq!(status, 202);
    assert_eq!(daemon.sigterm(), 0);
    let mut open = Vec::new();
    let mut todo = vec![dir.path().join("data")];
    while let Some(path) = todo.pop() {
        let meta = std::fs::metadata(&path).unwrap();
        if meta.permissions().mode() & 0o077 != 0 {
            open.push(format!(
                "{} {:o}",
                path.display(),
                meta.permissions().mode() & 0o777
            ));
        }
        if meta.is_dir() {
            todo.extend(std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()));
        }
    }
    assert!(open.is_empty(), "readable by others: {open:?}");
}

/// A config holding the API key inline that others may read is named in a warning at start;
/// once it is 0600, no warning.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secret_readable_by_others_is_warned_about_at_start() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let (_fake, mut daemon, _port, base, client) = start_binary(dir.path()).await;
    let config = daemon.config.clone();
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).unwrap();
    // The first start read the file as the test's umask made it: start again with 0644.
    assert_eq!(daemon.sigterm(), 0);
    std::fs::write(&daemon.log, "").unwrap();
    daemon.spawn();
    daemon.until_healthy(&client, &base).await;
    assert_eq!(daemon.sigterm(), 0);
    let log = std::fs::read_to_string(&daemon.log).unwrap();
    assert!(
        log.contains("readable by group or others") && log.contains("config.toml (mode 644)"),
        "{log}"
    );
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(&daemon.log, "").unwrap();
    daemon.spawn();
    daemon.until_healthy(&client, &base).await;
    assert_eq!(daemon.sigterm(), 0);
    let log = std::fs::read_to_string(&daemon.log).unwrap();
    assert!(!log.contains("readable by group or others"), "{log}");
}
