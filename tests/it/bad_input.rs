use std::process::Command;

use serde_json::Value;

use crate::common::*;

/// Malformed JSON, a missing id and a wrong type each get a 400 that names the place, and
/// `queue stats` (the real command, asking the running daemon) shows nothing was queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_a_400_naming_the_place_and_queues_nothing() {
    // Bind first so that the config file the CLI reads names the daemon's real port.
    let dir = tempfile::tempdir().unwrap();
    let fake = aiq_braze_sync::fake_braze::FakeBraze::start(API_KEY)
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let config_path = dir.path().join("config.toml");
    std::fs::write(
        &config_path,
        format!(
            "data_dir = {:?}\n[braze]\nendpoint = {:?}\napi_key = {API_KEY:?}\n[ingest]\nlisten = \"{addr}\"\ntoken = {TOKEN:?}\n",
            dir.path().join("data"),
            fake.url()
        ),
    )
    .unwrap();
    let cfg = aiq_braze_sync::config::Config::load(&config_path).expect("config loads");
    let daemon = aiq_braze_sync::daemon::start(&cfg, listener).await.unwrap();
    let client = http();
    let url = |p: &str| format!("http://{addr}{p}");

    let good = membership("u1", "a", "s", true);
    let cases: Vec<(&str, String, Value)> = vec![
        // Malformed JSON on the second line of an NDJSON body.
        (
            "/v1/memberships",
            format!("{good}\n{{\"audience_id\": \n"),
            serde_json::json!({"index": 1, "line": 2}),
        ),
        // A record without any user id, third in an array.
        (
            "/v1/memberships",
            array(&[
                good.clone(),
                good.clone(),
                serde_json::json!({"audience_id":"a","split_id":"s","member":true}),
            ]),
            serde_json::json!({"index": 2, "field": "external_id"}),
        ),
        // A wrong type: member as a string.
        (
            "/v1/memberships",
            array(&[
                good.clone(),
                serde_json::json!({"audience_id":"a","split_id":"s","external_id":"u2","member":"yes"}),
            ]),
            serde_json::json!({"index": 1, "field": "member"}),
        ),
        // Events: properties not an object, and an unparsable time.
        (
            "/v1/events",
            array(&[
                event(1),
                serde_json::json!({"name":"x","external_id":"u","time":"2026-13-45","properties":{}}),
            ]),
            serde_json::json!({"index": 1, "field": "time"}),
        ),
        (
            "/v1/events",
            array(&[
                serde_json::json!({"name":"x","external_id":"u","time":"2026-01-01T00:00:00Z","properties":"p"}),
            ]),
            serde_json::json!({"index": 0, "field": "properties"}),
        ),
    ];
    for (path, body, place) in cases {
        let (status, answer) = post(&client, &url(path), body).await;
        assert_eq!(status, 400, "{answer}");
        for (k, v) in place.as_object().unwrap() {
            assert_eq!(&answer[k], v, "{k} in {answer}");
        }
        let message = answer["error"].as_str().unwrap();
        assert!(message.starts_with("record "), "{message}");
    }

    // A body over the limit (16 MiB by default) is a 413.
    let (status, _) = post(&client, &url("/v1/memberships"), " ".repeat(17 << 20)).await;
    assert_eq!(status, 413);

    let out = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_aiq-braze-sync"))
            .args([
                "--config",
                config_path.to_str().unwrap(),
                "queue",
                "stats",
                "--json",
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stats: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(stats["source"], "daemon");
    assert_eq!(stats["queue"]["pending"], 0);
    assert_eq!(stats["queue"]["accepted_total"], 0);
    assert!(fake.requests().is_empty());
    daemon.shutdown().await.unwrap();
}
