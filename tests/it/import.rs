//! `import memberships|events|attributes FILE` through the real binary: CSV and NDJSON, good and bad
//! rows, stdin, with the daemon stopped (straight into the database) and running (through it).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use aiq_braze_sync::config::Config;
use fake_braze::FakeBraze;
use serde_json::Value;

use crate::common::*;

struct Setup {
    dir: tempfile::TempDir,
    config_path: PathBuf,
    config: Config,
    fake: FakeBraze,
    listener: Option<tokio::net::TcpListener>,
}

async fn setup() -> Setup {
    setup_with("").await
}

/// A stopped daemon's config (plus `extra` TOML), a fake Braze, and a listener for later.
async fn setup_with(extra: &str) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeBraze::start(API_KEY).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let config_path = dir.path().join("config.toml");
    std::fs::write(
        &config_path,
        format!(
            "data_dir = {:?}\n[braze]\nendpoint = {:?}\napi_key = {API_KEY:?}\n[ingest]\nlisten = \"{}\"\ntoken = {TOKEN:?}\n{}",
            dir.path().join("data"),
            fake.url(),
            listener.local_addr().unwrap(),
            // The fake starts with no profiles; let memberships create them (see common.rs).
            if extra.is_empty() {
                "[update_existing_only]\nmemberships = false\n"
            } else {
                extra
            }
        ),
    )
    .unwrap();
    let config = Config::load(&config_path).unwrap();
    Setup {
        dir,
        config_path,
        config,
        fake,
        listener: Some(listener),
    }
}

/// Runs the binary with `stdin` piped in; returns (success, stdout, stderr).
async fn run(config: &Path, args: &[&str], stdin: &str) -> (bool, String, String) {
    let (config, args, stdin) = (
        config.to_path_buf(),
        args.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        stdin.to_string(),
    );
    tokio::task::spawn_blocking(move || {
        let mut child = Command::new(env!("CARGO_BIN_EXE_aiq-braze-sync"))
            .arg("--config")
            .arg(&config)
            .args(&args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(stdin.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into(),
            String::from_utf8_lossy(&out.stderr).into(),
        )
    })
    .await
    .unwrap()
}

async fn pending(config: &Path) -> u64 {
    let (ok, stdout, stderr) = run(config, &["queue", "stats", "--json"], "").await;
    assert!(ok, "{stderr}");
    let v: Value = serde_json::from_str(&stdout).unwrap();
    v["queue"]["pending"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_csv_export_is_imported_while_stopped_and_delivered_once_the_daemon_runs() {
    let mut s = setup().await;
    let csv = s.dir.path().join("members.csv");
    std::fs::write(
        &csv,
        "audience_id,split_id,external_id,braze_id,member,time\n\
         1042,1,c-1,,true,2026-11-28T09:00:00Z\n\
         1042,1,c-2,,FALSE,\n\
         1042,2,,5f2b01,1,\n\
         2077,1,c-1,5f2b02,no,\n",
    )
    .unwrap();
    let (ok, stdout, stderr) = run(
        &s.config_path,
        &["import", "memberships", csv.to_str().unwrap()],
        "",
    )
    .await;
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("imported 4 memberships") && stdout.contains("database"),
        "{stdout}"
    );
    assert_eq!(pending(&s.config_path).await, 4);

    let daemon = aiq_braze_sync::daemon::start(&s.config, s.listener.take().unwrap())
        .await
        .unwrap();
    let fake = s.fake.clone();
    assert!(
        wait_until(Duration::from_secs(20), || fake.attribute_state().len()
            == 4)
        .await
    );
    let held = fake.attribute_state();
    let get = |u: &str, a: &str| held.get(&(u.to_string(), a.to_string())).cloned();
    assert_eq!(
        get("external_id:c-1", "AIQ_1042_1"),
        Some(Value::Bool(true))
    );
    assert_eq!(
        get("external_id:c-2", "AIQ_1042_1"),
        Some(Value::Bool(false))
    );
    assert_eq!(
        get("braze_id:5f2b01", "AIQ_1042_2"),
        Some(Value::Bool(true))
    );
    // Both ids given: sent with the external id.
    assert_eq!(
        get("external_id:c-1", "AIQ_2077_1"),
        Some(Value::Bool(false))
    );
    daemon.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ndjson_events_from_stdin_go_through_the_running_daemon() {
    let mut s = setup().await;
    let daemon = aiq_braze_sync::daemon::start(&s.config, s.listener.take().unwrap())
        .await
        .unwrap();
    let ndjson: String = (0..12_000u64).map(|i| format!("{}\n", event(i))).collect();
    let (ok, stdout, stderr) = run(&s.config_path, &["import", "events", "-"], &ndjson).await;
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("imported 12000 events") && stdout.contains("running daemon"),
        "{stdout}"
    );
    let fake = s.fake.clone();
    assert!(
        wait_until(Duration::from_secs(30), || event_counts(&fake).len()
            == 12_000)
        .await
    );
    // CSV events: extra columns become string properties.
    let csv = s.dir.path().join("events.csv");
    std::fs::write(&csv, "name,external_id,time,sku,properties\npurchase,c-9,2026-11-28T10:00:00Z,A1,\"{\"\"id\"\": 99999}\"\n").unwrap();
    let (ok, _, stderr) = run(
        &s.config_path,
        &["import", "events", csv.to_str().unwrap()],
        "",
    )
    .await;
    assert!(ok, "{stderr}");
    assert!(
        wait_until(Duration::from_secs(10), || event_counts(&fake)
            .contains_key(&99_999))
        .await
    );
    let e = fake
        .events()
        .into_iter()
        .find(|e| e["properties"]["id"] == 99_999)
        .unwrap();
    assert_eq!(e["properties"]["sku"], "A1");
    assert_eq!(e["external_id"], "c-9");
    daemon.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_with_a_bad_row_queues_nothing_unless_told_to_skip_it() {
    let s = setup().await;
    let csv = s.dir.path().join("members.csv");
    std::fs::write(
        &csv,
        "audience_id,split_id,external_id,member\n1,1,a,true\n1,1,b,true\n1,1,c,maybe\n1,1,,true\n1,1,e,false\n",
    )
    .unwrap();
    let (ok, _, stderr) = run(
        &s.config_path,
        &["import", "memberships", csv.to_str().unwrap()],
        "",
    )
    .await;
    assert!(!ok);
    assert!(
        stderr.contains("line 4")
            && stderr.contains("`member`")
            && stderr.contains("nothing was queued"),
        "{stderr}"
    );
    // The refusal happened before anything was queued (the database may not even exist).
    let (_, stdout, _) = run(&s.config_path, &["queue", "stats", "--json"], "").await;
    assert!(
        stdout.is_empty()
            || serde_json::from_str::<Value>(&stdout).unwrap()["queue"]["pending"] == 0
    );

    let (ok, stdout, stderr) = run(
        &s.config_path,
        &["import", "memberships", "--skip-bad", csv.to_str().unwrap()],
        "",
    )
    .await;
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("imported 3 memberships") && stdout.contains("2 bad rows skipped"),
        "{stdout}"
    );
    assert!(
        stderr.contains("line 4") && stderr.contains("line 5"),
        "{stderr}"
    );
    assert_eq!(pending(&s.config_path).await, 3);

    // Malformed NDJSON names its line too.
    let (ok, _, stderr) = run(
        &s.config_path,
        &["import", "events", "--format", "ndjson", "-"],
        "{\"name\":\"x\"\n",
    )
    .await;
    assert!(
        !ok && stderr.contains("line 1") && stderr.contains("invalid JSON"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_file_is_diffed_stopped_and_running_and_a_bad_one_changes_nothing() {
    let mut s = setup().await;
    let list = s.dir.path().join("members.csv");
    std::fs::write(&list, "external_id\na\nb\nc\n").unwrap();
    let args = ["import", "snapshot", "--audience", "1042", "--split", "1"];
    let (ok, stdout, stderr) = run(
        &s.config_path,
        &[&args[..], &[list.to_str().unwrap()]].concat(),
        "",
    )
    .await;
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("3 entered, 0 exited, 0 unchanged") && stdout.contains("database"),
        "{stdout}"
    );

    // A list with a bad line changes nothing.
    let (ok, _, stderr) = run(
        &s.config_path,
        &[&args[..], &["-"]].concat(),
        "{\"external_id\":\"a\"}\n{\"nobody\":1}\n",
    )
    .await;
    assert!(
        !ok && stderr.contains("line 2") && stderr.contains("nothing was changed"),
        "{stderr}"
    );

    let daemon = aiq_braze_sync::daemon::start(&s.config, s.listener.take().unwrap())
        .await
        .unwrap();
    let (ok, stdout, stderr) = run(
        &s.config_path,
        &[&args[..], &["-"]].concat(),
        "{\"external_id\":\"b\"}\n{\"external_id\":\"d\"}\n",
    )
    .await;
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("1 entered, 2 exited, 1 unchanged") && stdout.contains("running daemon"),
        "{stdout}"
    );
    let fake = s.fake.clone();
    let want = [("a", false), ("b", true), ("c", false), ("d", true)];
    assert!(
        wait_until(Duration::from_secs(20), || want.iter().all(|(u, m)| fake
            .attribute_value(&format!("external_id:{u}"), "AIQ_1042_1")
            == Some(Value::Bool(*m))))
        .await
    );
    // Empty needs --allow-empty, through the daemon too.
    let (ok, _, stderr) = run(&s.config_path, &[&args[..], &["-"]].concat(), "").await;
    assert!(!ok && stderr.contains("allow_empty"), "{stderr}");
    daemon.shutdown().await.unwrap();
}

/// Typed attribute columns: each cell reaches Braze as its column's JSON type; an empty cell
/// is left alone by default and unsets with `--empty-cells unset`; a bad cell is refused
/// with its line and column and nothing from the file is queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attribute_csv_cells_are_typed_by_their_header() {
    let mut s = setup().await;
    let csv = s.dir.path().join("attributes.csv");
    std::fs::write(
        &csv,
        "external_id,ltv:number,vip:boolean,signup:date,tags:array,tier\n\
         c-1,12.50,yes,2024-05-01,a;b,gold\n\
         c-2,-3,FALSE,2024-05-01T10:00:00+02:00,solo,\n\
         c-3,,,,,\n",
    )
    .unwrap();
    let bad = s.dir.path().join("bad.csv");
    std::fs::write(
        &bad,
        "external_id,signup:date\nc-1,2024-05-01\nc-2,2024-13-45\n",
    )
    .unwrap();
    let (ok, _, stderr) = run(
        &s.config_path,
        &["import", "attributes", bad.to_str().unwrap()],
        "",
    )
    .await;
    assert!(!ok);
    assert!(
        stderr.contains("line 3") && stderr.contains("signup") && stderr.contains("2024-13-45"),
        "{stderr}"
    );

    let (ok, stdout, stderr) = run(
        &s.config_path,
        &["import", "attributes", csv.to_str().unwrap()],
        "",
    )
    .await;
    assert!(ok, "{stderr}");
    // c-1: five cells, c-2: four (tier empty, skipped), c-3: nothing to do.
    assert!(stdout.contains("imported 9 attributes"), "{stdout}");
    // Nothing from the refused file was queued.
    assert_eq!(pending(&s.config_path).await, 9);

    let daemon = aiq_braze_sync::daemon::start(&s.config, s.listener.take().unwrap())
        .await
        .unwrap();
    let fake = s.fake.clone();
    assert!(
        wait_until(Duration::from_secs(20), || fake.attribute_state().len()
            == 9)
        .await
    );
    let held = fake.attribute_state();
    let get = |u: &str, a: &str| {
        held.get(&(format!("external_id:{u}"), a.to_string()))
            .cloned()
    };
    assert_eq!(get("c-1", "ltv"), Some(serde_json::json!(12.5)));
    assert_eq!(get("c-1", "vip"), Some(Value::Bool(true)));
    assert_eq!(
        get("c-1", "signup"),
        Some(serde_json::json!("2024-05-01T00:00:00.000Z"))
    );
    assert_eq!(get("c-1", "tags"), Some(serde_json::json!(["a", "b"])));
    assert_eq!(get("c-1", "tier"), Some(serde_json::json!("gold")));
    assert_eq!(get("c-2", "ltv"), Some(serde_json::json!(-3)));
    assert_eq!(get("c-2", "vip"), Some(Value::Bool(false)));
    assert_eq!(
        get("c-2", "signup"),
        Some(serde_json::json!("2024-05-01T08:00:00.000Z"))
    );
    assert_eq!(get("c-2", "tags"), Some(serde_json::json!(["solo"])));

    // Through the running daemon: an empty cell now unsets.
    let unset = s.dir.path().join("unset.csv");
    std::fs::write(&unset, "external_id,tier,ltv:number\nc-1,,13\n").unwrap();
    let (ok, stdout, stderr) = run(
        &s.config_path,
        &[
            "import",
            "attributes",
            "--empty-cells",
            "unset",
            unset.to_str().unwrap(),
        ],
        "",
    )
    .await;
    assert!(ok, "{stderr}");
    assert!(stdout.contains("running daemon"), "{stdout}");
    assert!(
        wait_until(Duration::from_secs(10), || {
            fake.attribute_value("external_id:c-1", "tier").is_none()
                && fake.attribute_value("external_id:c-1", "ltv") == Some(serde_json::json!(13))
        })
        .await
    );
    daemon.shutdown().await.unwrap();
}
