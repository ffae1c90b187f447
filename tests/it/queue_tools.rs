//! The operator's queue commands, through the real binary: against a stopped daemon (the
//! command opens the database) and a running one (it asks the daemon), with `--json` parsed.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use aiq_braze_sync::config::Config;
use aiq_braze_sync::queue::{BatchLimits, Outcome, Queue};
use aiq_braze_sync::record::{Event, Record, UserId};
use fake_braze::FakeBraze;
use serde_json::Value;

use crate::common::*;

fn cli(config: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_aiq-braze-sync"))
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

async fn cli_json(config: &Path, args: &[&str]) -> Value {
    let (config, args): (std::path::PathBuf, Vec<String>) =
        (config.into(), args.iter().map(|s| s.to_string()).collect());
    let (ok, stdout, stderr) = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        cli(&config, &args)
    })
    .await
    .unwrap();
    assert!(ok, "{stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

/// Queues `record` and gives it `outcome` as a worker would; returns its id.
async fn settle(q: &Queue, record: Record, outcome: Outcome) -> u64 {
    q.enqueue(vec![record]).await.unwrap();
    let limits = BatchLimits {
        max_objects: 75,
        per_array: false,
        max_bytes: 1 << 20,
    };
    let mut leased = q.lease(&limits).unwrap();
    assert_eq!(leased.len(), 1);
    let item = leased.pop().unwrap();
    let id = item.seq;
    q.complete(vec![(item, outcome)]).unwrap();
    id
}

fn ids(v: &Value) -> Vec<u64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|i| i.as_u64().unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_commands_work_stopped_and_running_and_retry_never_overwrites_a_newer_value() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeBraze::start(API_KEY).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let path = dir.path().join("config.toml");
    std::fs::write(
        &path,
        format!(
            "data_dir = {:?}\n[braze]\nendpoint = {:?}\napi_key = {API_KEY:?}\n[ingest]\nlisten = \"{addr}\"\ntoken = {TOKEN:?}\n[delivery]\nbackoff_initial_ms = 20\nbackoff_max_ms = 200\n[update_existing_only]\nmemberships = false\n",
            dir.path().join("data"),
            fake.url()
        ),
    )
    .unwrap();
    let config = Config::load(&path).unwrap();

    // While stopped: an old `true` for u1 is refused, then a newer `false` is delivered; an
    // event and u2's `true` are refused too.
    let q = aiq_braze_sync::daemon::open_queue(&config).await.unwrap();
    let old_true = settle(
        &q,
        member("u1", true),
        Outcome::Dead("EXAMPLE_REFUSAL".into()),
    )
    .await;
    settle(&q, member("u1", false), Outcome::Delivered).await;
    let event = Record::Event(Event::new(
        UserId::External("u3".into()),
        "purchase",
        "2026-11-28T10:00:00.000Z",
        None,
    ));
    let dead_event = settle(&q, event, Outcome::Dead("BAD_EVENT".into())).await;
    let u2_true = settle(
        &q,
        member("u2", true),
        Outcome::Dead("EXAMPLE_REFUSAL".into()),
    )
    .await;
    q.enqueue(vec![member("u4", true)]).await.unwrap(); // one left pending
    drop(q);

    let stats = cli_json(&path, &["queue", "stats", "--json"]).await;
    assert_eq!(stats["source"], "database");
    assert_eq!(
        (
            stats["queue"]["dead"].as_u64(),
            stats["queue"]["pending"].as_u64()
        ),
        (Some(3), Some(1))
    );
    let dead = cli_json(&path, &["queue", "dead", "--json"]).await;
    let records = dead["records"].as_array().unwrap();
    assert_eq!(records.len(), 3);
    assert_eq!(records[0]["id"], old_true);
    assert_eq!(records[0]["kind"], "membership");
    assert_eq!(records[0]["user"], "external_id:u1");
    assert_eq!(records[0]["what"], "AIQ_a_1 = true");
    assert_eq!(records[0]["reason"], "EXAMPLE_REFUSAL");
    assert_eq!(records[0]["attempts"], 1);
    assert_eq!(records[1]["reason"], "BAD_EVENT");
    let peek = cli_json(&path, &["queue", "peek", "--limit", "5", "--json"]).await;
    assert_eq!(peek["records"][0]["what"], "AIQ_a_1 = true");
    assert_eq!(peek["records"][0]["user"], "external_id:u4");
    // The readable table names the columns and Braze's reason.
    let (ok, table, _) = cli(&path, &["queue", "dead"]);
    assert!(
        ok && table.contains("REASON") && table.contains("EXAMPLE_REFUSAL"),
        "{table}"
    );

    // Running: the commands go through the daemon's admin API.
    let daemon = aiq_braze_sync::daemon::start(&config, listener)
        .await
        .unwrap();
    let report = cli_json(&path, &["queue", "retry-dead", "--all", "--json"]).await;
    assert_eq!(report["source"], "daemon");
    assert_eq!(ids(&report["report"]["retried"]), vec![dead_event, u2_true]);
    assert_eq!(
        ids(&report["report"]["superseded"]),
        vec![old_true],
        "{report}"
    );
    let fake2 = fake.clone();
    assert!(
        wait_until(Duration::from_secs(20), || fake2.events().len() == 1
            && fake2.attribute_value("external_id:u2", "AIQ_a_1")
                == Some(Value::Bool(true))
            && fake2.attribute_value("external_id:u4", "AIQ_a_1")
                == Some(Value::Bool(true)))
        .await
    );
    // The old `true` of u1 never reached Braze: its newer `false` stands.
    assert_eq!(fake.attribute_value("external_id:u1", "AIQ_a_1"), None);
    let dead = cli_json(&path, &["queue", "dead", "--json"]).await;
    assert_eq!(dead["source"], "daemon");
    assert!(dead["records"].as_array().unwrap().is_empty());
    let peek = cli_json(&path, &["queue", "peek", "--json"]).await;
    assert_eq!(peek["source"], "daemon");
    assert!(peek["records"].as_array().unwrap().is_empty(), "{peek}");
    let purge = cli_json(&path, &["queue", "purge-dead", "999", "--json"]).await;
    assert_eq!(ids(&purge["report"]["missing"]), vec![999]);
    // Neither --all nor ids: clap refuses it.
    let (ok, _, stderr) = cli(&path, &["queue", "purge-dead"]);
    assert!(!ok && stderr.contains("--all"), "{stderr}");
    daemon.shutdown().await.unwrap();

    // Neither possible: the database is held by another process and no daemon answers.
    let held = aiq_braze_sync::daemon::open_queue(&config).await.unwrap();
    let (ok, _, stderr) = cli(&path, &["queue", "stats"]);
    assert!(!ok);
    assert!(
        stderr.contains("locked by another process") && stderr.contains("did not answer"),
        "{stderr}"
    );
    // Stopped again: a dead record retried and one purged, by id, on the database itself.
    let first = settle(&held, member("u5", true), Outcome::Dead("X".into())).await;
    let second = settle(&held, member("u6", true), Outcome::Dead("Y".into())).await;
    drop(held);
    let retry = cli_json(
        &path,
        &["queue", "retry-dead", &first.to_string(), "--json"],
    )
    .await;
    assert_eq!(retry["source"], "database");
    assert_eq!(ids(&retry["report"]["retried"]), vec![first]);
    let purge = cli_json(&path, &["queue", "purge-dead", "--all", "--json"]).await;
    assert_eq!(purge["source"], "database");
    assert_eq!(ids(&purge["report"]["purged"]), vec![second]);
    let stats = cli_json(&path, &["queue", "stats", "--json"]).await;
    assert_eq!(
        (
            stats["queue"]["dead"].as_u64(),
            stats["queue"]["pending"].as_u64()
        ),
        (Some(0), Some(1))
    );
}

/// An operator sees what Braze refused: `queue dead --json` gives each dead letter the Braze
/// object as sent (an event with its properties), running and stopped, and the table shows
/// a short form of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_event_is_listed_with_the_object_braze_was_sent() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeBraze::start(API_KEY).await.unwrap();
    fake.reject_ids(["blocked".to_string()]);
    let port = free_port();
    let path = crate::binary::write_config(dir.path(), &fake, port);
    let config = Config::load(&path).unwrap();
    let running = start_in_process(&config).await;
    let base = format!("http://127.0.0.1:{port}");
    let event = serde_json::json!({"name": "purchase", "external_id": "blocked",
        "time": "2026-11-28T10:00:00Z", "properties": {"sku": "A1", "price": 9.5}});
    let (status, _) = post(&http(), &format!("{base}/v1/events"), array(&[event])).await;
    assert_eq!(status, 202);
    let q = running.queue.clone();
    assert!(wait_until(Duration::from_secs(10), || q.stats().unwrap().dead == 1).await);

    let expected = serde_json::json!({"external_id": "blocked", "_update_existing_only": false,
        "name": "purchase", "time": "2026-11-28T10:00:00.000Z", "properties": {"sku": "A1", "price": 9.5}});
    let dead = cli_json(&path, &["queue", "dead", "--json"]).await;
    assert_eq!(dead["source"], "daemon", "{dead}");
    assert_eq!(dead["records"][0]["object"], expected, "{dead}");
    assert!(dead["records"][0]["reason"]
        .as_str()
        .unwrap()
        .contains("BLACKLISTED_EXTERNAL_USER_ID"));
    let (ok, table, _) = cli(&path, &["queue", "dead"]);
    assert!(
        ok && table.contains("OBJECT") && table.contains(r#""sku":"A1""#),
        "{table}"
    );

    running.shutdown().await.unwrap();
    drop(q); // the last handle: the database closes and the command can open it
    let dead = cli_json(&path, &["queue", "dead", "--json"]).await;
    assert_eq!(dead["source"], "database", "{dead}");
    assert_eq!(dead["records"][0]["object"], expected, "{dead}");
}

/// The admin API carries personal data and can purge: with no token configured it answers
/// only on the admin socket (0600), which the `queue` commands use; over TCP it is refused
/// whatever the client, and with a token it needs the token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_needs_a_credential_and_the_commands_use_the_socket() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeBraze::start(API_KEY).await.unwrap();
    let start = |token: Option<&str>| {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let path = dir.path().join("config.toml");
        let token = token.map_or(String::new(), |t| format!("token = {t:?}\n"));
        std::fs::write(
            &path,
            format!(
                "data_dir = {:?}\n[braze]\nendpoint = {:?}\napi_key = {API_KEY:?}\n[ingest]\nlisten = \"{addr}\"\n{token}",
                dir.path().join("data"),
                fake.url()
            ),
        )
        .unwrap();
        (path, listener, addr)
    };

    // No token, loopback: what the defaults give.
    let (path, listener, addr) = start(None);
    let config = Config::load(&path).unwrap();
    listener.set_nonblocking(true).unwrap();
    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
    let daemon = aiq_braze_sync::daemon::start(&config, listener)
        .await
        .unwrap();
    let socket = dir.path().join("data").join("admin.sock");
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    let client = http();
    for (method, what) in [
        ("GET", "peek"),
        ("GET", "dead"),
        ("GET", "stats"),
        ("POST", "purge-dead"),
    ] {
        let r = client
            .request(
                method.parse().unwrap(),
                format!("http://{addr}/v1/admin/queue/{what}"),
            )
            .header("content-type", "application/json")
            .body(r#"{"all":true}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 403, "{what} over TCP without a token");
    }
    // Ingest still works without a token on loopback; the commands reach the daemon.
    let (status, _) = post(
        &client,
        &format!("http://{addr}/v1/memberships"),
        membership("u1", "a", "1", true).to_string(),
    )
    .await;
    assert_eq!(status, 202);
    let stats = cli_json(&path, &["queue", "stats", "--json"]).await;
    assert_eq!(stats["source"], "daemon", "{stats}");
    assert_eq!(stats["queue"]["accepted_total"], 1, "{stats}");
    daemon.shutdown().await.unwrap();
    assert!(!socket.exists(), "the socket is removed at a clean stop");

    // With a token: the admin API over TCP needs it; the socket needs none.
    let (path, listener, addr) = start(Some(TOKEN));
    let config = Config::load(&path).unwrap();
    listener.set_nonblocking(true).unwrap();
    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
    let daemon = aiq_braze_sync::daemon::start(&config, listener)
        .await
        .unwrap();
    let stats = format!("http://{addr}/v1/admin/queue/stats");
    let anonymous = client.get(&stats).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);
    let with_token = client.get(&stats).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(with_token.status(), 200);
    let peek = cli_json(&path, &["queue", "peek", "--json"]).await;
    assert_eq!(peek["source"], "daemon", "{peek}");
    daemon.shutdown().await.unwrap();
}
