//! Damaged queue files, as a failing disk or a careless operator leaves them: sled's file cut
//! short or emptied, an event segment deleted, bytes flipped. The daemon must refuse to start
//! and name what is damaged, never open a smaller queue without a word; with `--accept-loss`
//! it starts, and logs and counts what was given up.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fake_braze::{Behaviour, FakeBraze};

use super::binary::{start_binary, Daemon};
use super::common::post;

/// Queues memberships and events while Braze is down, then stops the daemon cleanly: every
/// record is on disk and none delivered. Returns the data directory.
async fn filled(dir: &Path) -> (FakeBraze, Daemon, u16, PathBuf) {
    let (fake, mut daemon, port, base, client) = start_binary(dir).await;
    fake.set_behaviour(Behaviour::FailStatus {
        status: 503,
        until: Instant::now() + Duration::from_secs(3600),
    });
    for batch in 0..12 {
        let members: String = (0..1000)
            .map(|i| {
                format!(
                    "{{\"audience_id\":\"a\",\"split_id\":\"1\",\"external_id\":\"u{batch}-{i}\",\"member\":true}}\n"
                )
            })
            .collect();
        let (status, _) = post(&client, &format!("{base}/v1/memberships"), members).await;
        assert_eq!(status, 202);
        let events: String = (0..500)
            .map(|i| {
                format!(
                    "{{\"name\":\"e\",\"external_id\":\"u{batch}-{i}\",\"time\":\"2026-01-01T00:00:00Z\"}}\n"
                )
            })
            .collect();
        let (status, _) = post(&client, &format!("{base}/v1/events"), events).await;
        assert_eq!(status, 202);
    }
    assert_eq!(daemon.sigterm(), 0);
    (fake, daemon, port, dir.join("data"))
}

/// Runs the daemon on what is there; returns its exit status (None: still running after
/// `wait`, with the child), and what it logged.
fn run(
    daemon: &Daemon,
    args: &[&str],
    wait: Duration,
) -> (Option<i32>, String, Option<std::process::Child>) {
    let log_path = daemon.log.with_extension("run.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_aiq-braze-sync"))
        .args(["--config", daemon.config.to_str().unwrap(), "run"])
        .args(args)
        .env_remove("AIQ_SYNC_ACCEPT_LOSS")
        .env_remove("NOTIFY_SOCKET")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let read = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let started = Instant::now();
    while started.elapsed() < wait {
        if let Some(status) = child.try_wait().unwrap() {
            return (status.code(), read(), None);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    (None, read(), Some(child))
}

fn sled_db(data: &Path) -> PathBuf {
    data.join("queue/gen-000001/db")
}

fn segments(data: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(data.join("queue/events"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    out.sort();
    out
}

fn refuses(daemon: &Daemon, names: &str) {
    let (code, log, child) = run(daemon, &[], Duration::from_secs(30));
    assert!(child.is_none(), "the daemon started on damaged files");
    assert_eq!(code, Some(7), "{log}");
    assert!(log.contains("damaged") && log.contains(names), "{log}");
    assert!(
        log.contains("--accept-loss") && log.contains("backup"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sled_file_cut_short_or_emptied_is_refused_by_name() {
    for keep in [2, 0] {
        let dir = tempfile::tempdir().unwrap();
        let (_fake, daemon, _, data) = filled(dir.path()).await;
        let db = sled_db(&data);
        let len = std::fs::metadata(&db).unwrap().len();
        let file = std::fs::OpenOptions::new().write(true).open(&db).unwrap();
        file.set_len(len.checked_div(keep).unwrap_or(0)).unwrap();
        drop(file);
        refuses(&daemon, "gen-000001");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flipped_bytes_in_sled_are_refused_by_name_or_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (_fake, mut daemon, port, data) = filled(dir.path()).await;
    let db = sled_db(&data);
    let mut bytes = std::fs::read(&db).unwrap();
    // 16 bytes in every 32 KiB, so that live pages are hit wherever sled keeps them.
    let len = bytes.len();
    for at in (4096..len).step_by(32 << 10) {
        for b in &mut bytes[at..(at + 16).min(len)] {
            *b ^= 0xA5;
        }
    }
    std::fs::write(&db, bytes).unwrap();
    let (code, log, child) = run(&daemon, &[], Duration::from_secs(5));
    assert!(!log.contains("panicked"), "{log}");
    match child {
        // Refused: by name, with the choices.
        None => {
            assert_eq!(code, Some(7), "{log}");
            assert!(
                log.contains("damaged") && log.contains("gen-000001"),
                "{log}"
            );
            assert!(log.contains("--accept-loss"), "{log}");
            // Accepted: the unreadable database is set aside and the daemon starts.
            let (code, log, child) = run(&daemon, &["--accept-loss"], Duration::from_secs(3));
            assert!(code.is_none(), "exited {code:?}: {log}");
            daemon.child = child;
            let client = super::common::http();
            super::binary::wait_healthy(&client, &format!("http://127.0.0.1:{port}")).await;
            let aside = data.join("queue/damaged-gen-000001");
            assert!(aside.is_dir(), "the damaged database is kept aside");
            let stats = super::binary::cli_json(&daemon.config, &["queue", "stats", "--json"]);
            assert!(stats["queue"]["lost_total"].as_u64() > Some(0), "{stats}");
        }
        // Or sled read every record back despite the flips: then nothing may be missing.
        Some(child) => {
            daemon.child = Some(child);
            let stats = super::binary::cli_json(&daemon.config, &["queue", "stats", "--json"]);
            assert_eq!(stats["queue"]["pending"], 18_000, "{stats} {log} {port}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_event_segment_is_refused_and_accept_loss_starts_counting_it() {
    let dir = tempfile::tempdir().unwrap();
    let (fake, mut daemon, port, data) = filled(dir.path()).await;
    let segment = segments(&data)[0].clone();
    std::fs::remove_file(&segment).unwrap();
    refuses(&daemon, segment.file_name().unwrap().to_str().unwrap());

    // Accepting the loss: it starts, says what it gave up, counts it, and delivers the rest.
    fake.set_behaviour(Behaviour::Accept);
    let (code, log, child) = run(&daemon, &["--accept-loss"], Duration::from_secs(3));
    assert!(code.is_none(), "exited {code:?}: {log}");
    daemon.child = child;
    let client = super::common::http();
    let base = format!("http://127.0.0.1:{port}");
    super::binary::wait_healthy(&client, &base).await;
    let metrics = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let lost: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("aiq_braze_sync_queue_lost_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no queue_lost_total in {metrics}"));
    assert!(lost > 0, "{metrics}");
    // Every membership still arrives; the events of the deleted segment do not.
    let deadline = Instant::now() + Duration::from_secs(60);
    while fake.attributes().len() < 12_000 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(fake.attributes().len(), 12_000);
    assert!(fake.events().len() < 6_000);
    assert_eq!(
        daemon.sigterm(),
        0,
        "after accepting, the next start needs no flag"
    );
    let (code, log, child) = run(&daemon, &[], Duration::from_secs(3));
    assert!(code.is_none(), "exited {code:?}: {log}");
    daemon.child = child;
}
