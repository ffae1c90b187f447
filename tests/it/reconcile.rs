//! `reconcile` through the real binary against the fake Braze: update-only flags sent before
//! the profiles existed and values changed out of band are found, repaired through the
//! running daemon and into a stopped one's database, and the lookups keep to Braze's 50 ids
//! a call.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use aiq_braze_sync::config::Config;
use fake_braze::FakeBraze;
use serde_json::{json, Value};

use crate::common::*;

const PATH: &str = "/v1/audiences/1042/splits/1/members";
const ATTRIBUTE: &str = "AIQ_1042_1";

/// Runs `reconcile` with `args`; returns its exit code and its JSON report.
async fn reconcile(config: &Path, args: &[&str]) -> (i32, Value, String) {
    let (config, args): (std::path::PathBuf, Vec<String>) =
        (config.into(), args.iter().map(|s| s.to_string()).collect());
    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_aiq-braze-sync"))
            .arg("--config")
            .arg(&config)
            .args(["reconcile", "--audience", "1042", "--split", "1", "--json"])
            .args(&args)
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let report = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    (out.status.code().unwrap_or(-1), report, stderr)
}

fn drift(report: &Value) -> Vec<(String, String)> {
    let mut d: Vec<(String, String)> = report["drift"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|d| {
            (
                d["external_id"].as_str().unwrap().to_string(),
                d["found"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    d.sort();
    d
}

fn holds_true(fake: &FakeBraze, users: &[String]) -> bool {
    users
        .iter()
        .all(|u| fake.attribute_value(&format!("external_id:{u}"), ATTRIBUTE) == Some(json!(true)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_finds_what_braze_lacks_and_repairs_it_running_and_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeBraze::start(API_KEY).await.unwrap();
    let port = free_port();
    let path = dir.path().join("config.toml");
    // The shipped policy: memberships are update-only.
    std::fs::write(
        &path,
        format!(
            "data_dir = {:?}\n[braze]\nendpoint = {:?}\napi_key = {API_KEY:?}\n\
             [ingest]\nlisten = \"127.0.0.1:{port}\"\ntoken = {TOKEN:?}\n\
             [delivery]\nbackoff_initial_ms = 20\nbackoff_max_ms = 200\n",
            dir.path().join("data"),
            fake.url()
        ),
    )
    .unwrap();
    let config = Config::load(&path).unwrap();
    let running = start_in_process(&config).await;
    let base = format!("http://127.0.0.1:{port}");

    // 120 members; the first 100 have profiles, the last 20 sign up only later.
    let users: Vec<String> = (0..120).map(|i| format!("r{i}")).collect();
    for u in &users[..100] {
        fake.create_profile(u);
    }
    let (status, v) = crate::snapshot::put(
        &base,
        PATH,
        crate::snapshot::ndjson(users.clone()),
        "application/x-ndjson",
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let q = running.queue.clone();
    assert!(wait_until(Duration::from_secs(10), || q.pending() == 0).await);
    assert!(holds_true(&fake, &users[..100]));
    // An unsubscribe link, say, turns one off behind the daemon's back.
    fake.set_attribute_out_of_band("r5", ATTRIBUTE, json!(false));

    let (code, report, stderr) = reconcile(&path, &[]).await;
    assert_eq!(code, 1, "{report} {stderr}");
    let mut expected = vec![("r5".to_string(), "holds false".to_string())];
    expected.extend(
        users[100..]
            .iter()
            .map(|u| (u.clone(), "no profile".to_string())),
    );
    expected.sort();
    assert_eq!(drift(&report), expected, "{report}");
    assert_eq!(
        (report["members"].as_u64(), report["checked"].as_u64()),
        (Some(120), Some(120))
    );
    // Braze's limit of 50 ids a lookup: 50, 50, 20.
    let sizes: Vec<usize> = fake
        .export_requests()
        .iter()
        .map(|r| r.body["external_ids"].as_array().map_or(0, Vec::len))
        .collect();
    assert_eq!(sizes, [50, 50, 20]);

    // The latecomers sign up; a repair through the running daemon sets every flag.
    for u in &users[100..] {
        fake.create_profile(u);
    }
    let (code, report, stderr) = reconcile(&path, &["--repair"]).await;
    assert_eq!(
        (code, &report["repaired"]),
        (0, &json!(21)),
        "{report} {stderr}"
    );
    assert!(
        wait_until(Duration::from_secs(10), || holds_true(&fake, &users)).await,
        "{:?}",
        fake.attribute_state()
    );
    let (code, report, _) = reconcile(&path, &[]).await;
    assert_eq!((code, drift(&report)), (0, vec![]), "{report}");

    // Stopped: the repair goes into the database and is delivered at the next start.
    running.shutdown().await.unwrap();
    drop(q);
    fake.set_attribute_out_of_band("r7", ATTRIBUTE, Value::Null);
    let (code, report, stderr) = reconcile(&path, &["--repair"]).await;
    assert_eq!(
        (code, &report["repaired"]),
        (0, &json!(1)),
        "{report} {stderr}"
    );
    let running = start_in_process(&config).await;
    assert!(wait_until(Duration::from_secs(10), || holds_true(&fake, &users)).await);
    running.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconcile_says_what_is_wrong_with_the_key_and_a_split_without_a_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeBraze::start(API_KEY).await.unwrap();
    let path = crate::binary::write_config(dir.path(), &fake, free_port());
    let (code, _, stderr) = reconcile(&path, &[]).await;
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("no snapshot of audience 1042 split 1"),
        "{stderr}"
    );

    // A snapshot taken while stopped, then a key without users.export.ids: exit 5 as `check`.
    let file = dir.path().join("members.ndjson");
    std::fs::write(&file, crate::snapshot::ndjson(["a".to_string()])).unwrap();
    let imported = Command::new(env!("CARGO_BIN_EXE_aiq-braze-sync"))
        .arg("--config")
        .arg(&path)
        .args(["import", "snapshot", "--audience", "1042", "--split", "1"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        imported.status.success(),
        "{}",
        String::from_utf8_lossy(&imported.stderr)
    );
    fake.set_permissions(true, false);
    let (code, _, stderr) = reconcile(&path, &[]).await;
    assert_eq!(code, 5, "{stderr}");
}
