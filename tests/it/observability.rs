//! What an operator sees: `/metrics` parsed and checked against a known workload, `/healthz`
//! and `/readyz` with their reasons, and log lines in both formats.

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fake_braze::Behaviour;
use serde_json::{json, Value};

use crate::common::*;

/// `/metrics` as sample name (with labels) -> value; panics on a line that is not a sample,
/// a comment or the end marker.
async fn scrape(env: &Env) -> (HashMap<String, f64>, String) {
    let r = env
        .client
        .get(format!("{}/metrics", env.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let content_type = r.headers()["content-type"].to_str().unwrap().to_string();
    assert!(
        content_type.starts_with("application/openmetrics-text"),
        "{content_type}"
    );
    let text = r.text().await.unwrap();
    let mut samples = HashMap::new();
    for line in text.lines() {
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (name, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("not a sample: {line}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("not a number: {line}"));
        samples.insert(name.to_string(), value);
    }
    assert!(text.ends_with("# EOF\n"), "{text}");
    (samples, text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_a_known_workload() {
    let env = Env::start().await;
    env.fake.reject_ids(["refused-user".to_string()]);
    let memberships: Vec<Value> = (0..10)
        .map(|i| membership(&format!("m{i}"), "5", "1", true))
        .collect();
    assert_eq!(
        env.post("/v1/memberships", array(&memberships)).await.0,
        202
    );
    let attributes = array(&[
        json!({"external_id": "a1", "attributes": {"tier": "gold", "n": 1}}),
        json!({"external_id": "a2", "attributes": {"tier": "blue", "n": 2}}),
    ]);
    assert_eq!(env.post("/v1/attributes", attributes.clone()).await.0, 202);
    let mut events: Vec<Value> = (0..5).map(event).collect();
    events[4]["external_id"] = json!("refused-user");
    assert_eq!(env.post("/v1/events", array(&events)).await.0, 202);
    let fake = env.fake.clone();
    assert!(wait_until(Duration::from_secs(10), || fake.events().len() == 4).await);
    let (drained, _) = wait_for_stats(&env, Duration::from_secs(10), |s| {
        s["queue"]["pending"] == 0
    })
    .await;
    assert!(drained);
    // The same attribute values again: accepted, and skipped.
    assert_eq!(env.post("/v1/attributes", attributes).await.0, 202);
    // Braze rate-limits the next request once.
    env.fake.set_behaviour(Behaviour::RateLimited {
        retry_after: Duration::from_secs(1),
        until: Instant::now() + Duration::from_millis(300),
    });
    let track = json!({
        "events": [
            {"external_id": "r", "name": "a", "time": "2026-11-28T10:00:00Z"},
            {"external_id": "r", "name": "b", "time": "2026-11-28T10:00:00Z"},
            {"external_id": "r", "name": "c", "time": "2026-11-28T10:00:00Z"},
        ],
        "purchases": [
            {"external_id": "r", "product_id": "p", "currency": "EUR", "price": 1, "time": "2026-11-28T10:00:00Z"},
            {"external_id": "r", "product_id": "q", "currency": "EUR", "price": 2, "time": "2026-11-28T10:00:00Z"},
        ],
    });
    assert_eq!(env.post("/users/track", track.to_string()).await.0, 201);
    assert!(
        wait_until(Duration::from_secs(15), || fake.purchases().len() == 2
            && fake.events().len() == 7)
        .await
    );
    let (drained, stats) = wait_for_stats(&env, Duration::from_secs(10), |s| {
        s["queue"]["pending"] == 0
    })
    .await;
    assert!(drained, "{stats}");

    let (m, text) = scrape(&env).await;
    let get = |name: &str| {
        *m.get(name)
            .unwrap_or_else(|| panic!("no sample {name} in:\n{text}"))
    };
    for (kind, accepted, delivered) in [
        ("membership", 10.0, 10.0),
        ("attribute", 8.0, 4.0),
        ("event", 8.0, 7.0),
        ("purchase", 2.0, 2.0),
    ] {
        assert_eq!(
            get(&format!(
                "aiq_braze_sync_records_accepted_total{{kind=\"{kind}\"}}"
            )),
            accepted,
            "{kind}"
        );
        assert_eq!(
            get(&format!(
                "aiq_braze_sync_records_delivered_total{{kind=\"{kind}\"}}"
            )),
            delivered,
            "{kind}"
        );
    }
    assert_eq!(
        get("aiq_braze_sync_records_dead_total{kind=\"event\"}"),
        1.0
    );
    assert_eq!(
        get("aiq_braze_sync_records_skipped_unchanged_total{kind=\"attribute\"}"),
        4.0
    );
    assert_eq!(get("aiq_braze_sync_queue_pending{lane=\"events\"}"), 0.0);
    assert_eq!(
        get("aiq_braze_sync_queue_pending{lane=\"attributes\"}"),
        0.0
    );
    assert_eq!(get("aiq_braze_sync_queue_dead"), 1.0);
    assert!(get("aiq_braze_sync_queue_disk_bytes") > 0.0);
    assert!(get("aiq_braze_sync_queue_max_disk_bytes") > get("aiq_braze_sync_queue_disk_bytes"));
    assert!(get("aiq_braze_sync_queue_max_records") > 0.0);
    assert_eq!(
        get("aiq_braze_sync_delivery_state{state=\"delivering\"}"),
        1.0
    );
    assert_eq!(get("aiq_braze_sync_delivery_state{state=\"paused\"}"), 0.0);
    assert!(get("aiq_braze_sync_braze_requests_total{outcome=\"rate_limited\"}") >= 1.0);
    assert!(get("aiq_braze_sync_records_retried_total") >= 1.0);
    // Every request Braze answered is in the latency histogram, and in one outcome.
    let requests: f64 = [
        "accepted",
        "refused",
        "rate_limited",
        "failed",
        "misconfigured",
    ]
    .iter()
    .map(|o| {
        get(&format!(
            "aiq_braze_sync_braze_requests_total{{outcome=\"{o}\"}}"
        ))
    })
    .sum();
    assert_eq!(requests, fake.requests().len() as f64, "{text}");
    assert_eq!(
        get("aiq_braze_sync_braze_request_duration_seconds_count"),
        requests
    );
    assert!(get("aiq_braze_sync_braze_request_duration_seconds_sum") > 0.0);
    assert_eq!(
        get("aiq_braze_sync_braze_request_duration_seconds_bucket{le=\"+Inf\"}"),
        requests
    );
    // The version, and the process as every Prometheus client names it.
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(
        get(&format!(
            "aiq_braze_sync_build_info{{version=\"{version}\"}}"
        )),
        1.0
    );
    assert!(get("process_resident_memory_bytes") > 1e6, "{text}");
    assert!(get("process_open_fds") > 3.0);
    assert!(get("process_max_fds") >= get("process_open_fds"));
    assert!(get("process_cpu_seconds_total") > 0.0);
    let started = get("process_start_time_seconds");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(
        started > now - 3600.0 && started <= now + 1.0,
        "{started} vs {now}"
    );
}

/// The oldest pending age has sub-second resolution: a record half a second old does not
/// read as 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_oldest_pending_age_is_shown_to_the_millisecond() {
    let env = Env::start().await;
    env.fake.set_behaviour(Behaviour::FailStatus {
        status: 503,
        until: Instant::now() + Duration::from_secs(60),
    });
    assert_eq!(env.post("/v1/events", array(&[event(1)])).await.0, 202);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let (m, text) = scrape(&env).await;
    let age = m["aiq_braze_sync_queue_oldest_pending_age_seconds"];
    assert!(
        (0.5..30.0).contains(&age) && age.fract() != 0.0,
        "{age}: {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_says_alive_and_readyz_gives_its_reason_when_not_ready() {
    let env = Env::start().await;
    let get = |path: &'static str| {
        let (client, base) = (env.client.clone(), env.base.clone());
        async move {
            let r = client.get(format!("{base}{path}")).send().await.unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap())
        }
    };
    assert_eq!(get("/healthz").await, (200, json!({"alive": true})));
    let (status, ready) = get("/readyz").await;
    assert_eq!(status, 200);
    assert_eq!(ready["ready"], true);
    assert_eq!(ready["delivery"]["state"], "delivering");
    let (m, text) = scrape(&env).await;
    assert_eq!(m.get("aiq_braze_sync_ready"), Some(&1.0), "{text}");
    assert!(!text.contains("not_ready_cause{"), "{text}");

    // Braze refuses the key: not ready, and it says why, in /readyz and in /metrics.
    env.fake.set_behaviour(Behaviour::FailStatus {
        status: 401,
        until: Instant::now() + Duration::from_secs(2),
    });
    assert_eq!(env.post("/v1/events", array(&[event(1)])).await.0, 202);
    let mut seen = None;
    let mut metric_seen = false;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) && (seen.is_none() || !metric_seen) {
        let (status, body) = get("/readyz").await;
        if status == 503 && seen.is_none() {
            seen = Some(body);
        }
        let (m, _) = scrape(&env).await;
        if m.get("aiq_braze_sync_not_ready_cause{cause=\"paused\"}") == Some(&1.0) {
            assert_eq!(m.get("aiq_braze_sync_ready"), Some(&0.0));
            metric_seen = true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(metric_seen, "the metrics never said paused");
    let body = seen.expect("readyz never said not ready");
    assert_eq!(body["ready"], false);
    let reason = body["reason"].as_str().unwrap();
    assert!(
        reason.contains("paused") && reason.contains("401"),
        "{reason}"
    );

    // Once the key works again delivery resumes by itself, and readyz says so.
    let fake = env.fake.clone();
    assert!(wait_until(Duration::from_secs(15), || fake.events().len() == 1).await);
    let (status, ready) = get("/readyz").await;
    assert_eq!((status, &ready["ready"]), (200, &json!(true)));
}

/// Log lines: JSON objects with `--log-format json`; under journald (`JOURNAL_STREAM` set),
/// every line starts with its syslog priority (`<4>` a warning, `<6>` information), the prefix
/// journald keeps as the entry's priority, and text lines carry no timestamp of their own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_lines_are_json_for_shippers_and_carry_their_priority_under_journald() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let fake = fake_braze::FakeBraze::start(API_KEY).await.unwrap();
    // A key file others can read: the daemon starts, with a warning.
    let key_file = dir.path().join("braze.key");
    std::fs::write(&key_file, API_KEY).unwrap();
    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {:?}\n[braze]\nendpoint = {:?}\napi_key_file = {:?}\n[ingest]\nlisten = \"127.0.0.1:0\"\n",
            dir.path().join("data"),
            fake.url(),
            key_file,
        ),
    )
    .unwrap();
    for (args, journald) in [
        (vec!["--log-format", "json"], false),
        (vec![], true),
        (vec!["--log-format", "json"], true),
    ] {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_aiq-braze-sync"));
        cmd.arg("--config")
            .arg(&config)
            .args(&args)
            .arg("run")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("JOURNAL_STREAM")
            .env_remove("CREDENTIALS_DIRECTORY")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if journald {
            cmd.env("JOURNAL_STREAM", "8:12345");
        }
        let child = cmd.spawn().unwrap();
        // Let it start and log its ready line, then stop it.
        let started = Instant::now();
        while !dir.path().join("data/daemon.pid").exists()
            && started.elapsed() < Duration::from_secs(20)
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = stderr.lines().collect();
        assert!(lines.len() >= 3, "{stderr}");
        let json = !args.is_empty();
        let mut priorities = Vec::new();
        for line in lines {
            let rest = if journald {
                let (priority, rest) = line
                    .strip_prefix('<')
                    .and_then(|l| l.split_once('>'))
                    .unwrap_or_else(|| panic!("no priority prefix under journald: {line}"));
                priorities.push(priority.to_string());
                let level = match priority {
                    "4" => "WARN",
                    "6" => "INFO",
                    other => panic!("priority {other} for a line of this run: {line}"),
                };
                assert!(rest.contains(level), "priority {priority} on: {line}");
                rest
            } else {
                line
            };
            if json {
                let v: Value =
                    serde_json::from_str(rest).unwrap_or_else(|e| panic!("not JSON ({e}): {rest}"));
                assert!(v["timestamp"].is_string() && v["level"].is_string(), "{v}");
                assert!(v["fields"]["message"].is_string(), "{v}");
            } else {
                assert!(
                    rest.trim_start().starts_with("INFO") || rest.trim_start().starts_with("WARN"),
                    "a stamped or odd line under journald: {line}"
                );
            }
        }
        if journald {
            assert!(
                priorities.contains(&"4".to_string()),
                "no warning in: {stderr}"
            );
            assert!(
                priorities.contains(&"6".to_string()),
                "no information in: {stderr}"
            );
        }
        assert!(stderr.contains("aiq-braze-sync ready"), "{stderr}");
        assert!(!stderr.contains(API_KEY), "the API key was logged");
    }
}
