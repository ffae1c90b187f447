//! A real Braze client that nobody here wrote — the npm package `braze-api` 2.13.4
//! (github.com/braze-community/braze-node), pinned in `tests/braze-client/` — pointed at the
//! daemon instead of at Braze. Its calls are relayed, its answers are the ones it expects
//! from Braze, and its errors are the ones it knows how to read.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};

use crate::common::*;

fn client_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/braze-client")
}

/// Installs the pinned client from the npm registry if it is not there yet (`.ci/run` does
/// this up front; doing it here too keeps a bare `cargo test` self-sufficient).
fn install_client() {
    let dir = client_dir();
    if dir.join("node_modules/braze-api/package.json").exists() {
        return;
    }
    let status = Command::new("npm")
        .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
        .current_dir(&dir)
        .status()
        .unwrap_or_else(|e| {
            panic!("this test needs Node.js and npm (`bash .ci/run` installs them): {e}")
        });
    assert!(status.success(), "npm ci in {} failed", dir.display());
}

/// Runs one step of `client.js` against `base` with `key`; returns what it printed.
async fn run(base: &str, key: &str, step: &str) -> Value {
    let (base, key, step) = (base.to_string(), key.to_string(), step.to_string());
    let out = tokio::task::spawn_blocking(move || {
        Command::new("node")
            .arg("client.js")
            .arg(&step)
            .current_dir(client_dir())
            .env("BRAZE_URL", base)
            .env("BRAZE_KEY", key)
            .output()
            .expect("node runs")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "node client.js failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_npm_braze_client_gets_its_calls_relayed() {
    tokio::task::spawn_blocking(install_client).await.unwrap();
    let env = Env::start_with(|c| c.ingest.export_passthrough = true).await;

    let track = run(&env.base, TOKEN, "track").await;
    assert_eq!(
        track,
        json!({"ok": true, "answer": {"message": "success", "attributes_processed": 4,
               "events_processed": 2, "purchases_processed": 1}})
    );
    let bulk = run(&env.base, TOKEN, "bulk").await;
    assert_eq!(bulk["answer"]["message"], "success", "{bulk}");

    let fake = env.fake.clone();
    let arrived = wait_until(Duration::from_secs(20), || {
        fake.events().len() == 2
            && fake.purchases().len() == 1
            && fake.attribute_value("external_id:node-1", "pets") == Some(json!(["cat"]))
            && fake.attribute_value("external_id:node-3", "bulk") == Some(json!(true))
    })
    .await;
    assert!(arrived, "the client's writes did not all reach Braze");
    assert_eq!(
        fake.attribute_value("external_id:node-1", "tier"),
        Some(json!("gold"))
    );
    assert_eq!(
        fake.attribute_value("external_id:node-2", "address"),
        Some(json!({"city": "Oslo"}))
    );
    assert_eq!(
        fake.attribute_value("user_alias:crm:node-alias", "score"),
        Some(json!(7))
    );
    let signed_up = fake
        .events()
        .into_iter()
        .find(|e| e["name"] == "signed_up")
        .expect("signed_up arrived");
    assert_eq!(
        signed_up,
        json!({"external_id": "node-1", "name": "signed_up", "time": "2026-11-28T10:00:00.000Z",
               "properties": {"plan": "pro"}})
    );
    assert_eq!(fake.purchases()[0]["quantity"], 3);

    // One refused object beside a good one: success, with Braze's error entry.
    let partial = run(&env.base, TOKEN, "partial").await;
    assert_eq!(partial["ok"], true, "{partial}");
    assert_eq!(partial["answer"]["events_processed"], 1);
    assert_eq!(partial["answer"]["errors"][0]["input_array"], "events");
    assert_eq!(partial["answer"]["errors"][0]["index"], 1);

    // Nothing usable, and a wrong key: the client throws with Braze's status and message.
    let invalid = run(&env.base, TOKEN, "invalid").await;
    assert_eq!(invalid["ok"], false, "{invalid}");
    assert_eq!(invalid["status"], 400);
    assert!(invalid["message"]
        .as_str()
        .unwrap()
        .starts_with("Valid data must be provided"));
    assert_eq!(invalid["errors"][0]["index"], 0);
    let wrong_key = run(&env.base, "not-the-token", "track").await;
    assert_eq!(
        wrong_key,
        json!({"ok": false, "status": 401, "message": "Invalid API key", "errors": []})
    );

    // A lookup through the daemon reaches Braze and comes back as Braze answered it.
    let export = run(&env.base, TOKEN, "export").await;
    assert_eq!(export["ok"], true, "{export}");
    let users = export["answer"]["users"].as_array().unwrap();
    assert_eq!(users.len(), 1, "{export}");
    assert_eq!(users[0]["external_id"], "node-1");
    assert_eq!(users[0]["custom_attributes"]["tier"], "gold");
    assert_eq!(export["answer"]["invalid_user_ids"], json!(["nobody"]));

    let stats = env.stats().await;
    assert_eq!(stats["queue"]["dead"], 0, "{stats}");
}
