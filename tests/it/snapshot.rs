//! Audience snapshots: diffing, refusal of bad and empty uploads, one upload per split, and
//! uploads that stop half-way (dropped connection, SIGKILL) changing nothing.

use std::time::Duration;

use serde_json::Value;
use tokio::io::AsyncWriteExt;

use crate::common::*;

const PATH: &str = "/v1/audiences/1042/splits/1/members";

pub async fn put(env_base: &str, path: &str, body: String, content_type: &str) -> (u16, Value) {
    let r = http()
        .put(format!("{env_base}{path}"))
        .bearer_auth(TOKEN)
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

pub fn ndjson(users: impl IntoIterator<Item = String>) -> String {
    users
        .into_iter()
        .map(|u| format!("{{\"external_id\":\"{u}\"}}\n"))
        .collect()
}

pub fn counts(v: &Value) -> (u64, u64, u64) {
    (
        v["entered"].as_u64().unwrap(),
        v["exited"].as_u64().unwrap(),
        v["unchanged"].as_u64().unwrap(),
    )
}

/// Starts an upload by hand and sends only part of its body, leaving the connection open.
pub async fn half_upload(addr: &str, path: &str, lines: usize) -> tokio::net::TcpStream {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let part = ndjson((0..lines).map(|i| format!("half-{i}")));
    let head = format!(
        "PUT {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: application/x-ndjson\r\nContent-Length: {}\r\n\r\n",
        part.len() * 10
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(part.as_bytes()).await.unwrap();
    s.flush().await.unwrap();
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_queues_only_who_entered_and_who_left() {
    let mut env = Env::start().await;
    let (status, v) = put(
        &env.base,
        PATH,
        ndjson(["a", "b", "c"].map(String::from)),
        "application/x-ndjson",
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(counts(&v), (3, 0, 0));
    // The same split as CSV: b, c stay, d enters, a leaves.
    let (status, v) = put(&env.base, PATH, "external_id\nb\nc\nd\n".into(), "text/csv").await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(counts(&v), (1, 1, 2));
    assert_eq!(v["members"], 3);

    let fake = env.fake.clone();
    let want = [("a", false), ("b", true), ("c", true), ("d", true)];
    assert!(
        wait_until(Duration::from_secs(20), || want.iter().all(|(u, m)| fake
            .attribute_value(&format!("external_id:{u}"), "AIQ_1042_1")
            == Some(Value::Bool(*m))))
        .await
    );
    // Another split is independent.
    let (status, v) = put(
        &env.base,
        "/v1/audiences/1042/splits/2/members",
        ndjson(["a".to_string()]),
        "application/x-ndjson",
    )
    .await;
    assert_eq!((status, counts(&v)), (200, (1, 0, 0)));
    env.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_line_an_empty_upload_or_a_dropped_connection_leaves_the_old_snapshot_in_place() {
    let mut env = Env::start().await;
    let first: Vec<String> = (0..100).map(|i| format!("u{i}")).collect();
    let (status, _) = put(
        &env.base,
        PATH,
        ndjson(first.clone()),
        "application/x-ndjson",
    )
    .await;
    assert_eq!(status, 200);

    let mut bad = ndjson(["x".to_string(), "y".to_string()]);
    bad.push_str("{\"email\":\"z@example.com\"}\n");
    let (status, v) = put(&env.base, PATH, bad, "application/x-ndjson").await;
    assert_eq!(status, 400, "{v}");
    assert_eq!(v["line"], 3, "{v}");

    let (status, v) = put(&env.base, PATH, String::new(), "application/x-ndjson").await;
    assert_eq!(status, 400);
    assert!(v["error"].as_str().unwrap().contains("allow_empty"), "{v}");

    let addr = env.base.trim_start_matches("http://").to_string();
    let dropped = half_upload(&addr, PATH, 50).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(dropped);
    tokio::time::sleep(Duration::from_millis(100)).await;

    // Still diffed against the first snapshot.
    let mut next = first.clone();
    next.push("new".into());
    let (status, v) = put(&env.base, PATH, ndjson(next), "application/x-ndjson").await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(counts(&v), (1, 0, 100));

    // Emptying a split takes an explicit yes.
    let (status, v) = put(
        &env.base,
        &format!("{PATH}?allow_empty=true"),
        String::new(),
        "application/x-ndjson",
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(counts(&v), (0, 101, 0));
    env.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_snapshots_of_one_split_never_interleave() {
    let mut env = Env::start().await;
    let addr = env.base.trim_start_matches("http://").to_string();
    let first = half_upload(&addr, PATH, 10).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (status, v) = put(
        &env.base,
        PATH,
        ndjson(["a".to_string()]),
        "application/x-ndjson",
    )
    .await;
    assert_eq!(status, 409, "{v}");
    let (status, _) = put(
        &env.base,
        "/v1/audiences/1042/splits/9/members",
        ndjson(["a".to_string()]),
        "application/x-ndjson",
    )
    .await;
    assert_eq!(status, 200, "another split is not blocked");
    drop(first);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (status, v) = put(
        &env.base,
        PATH,
        ndjson(["a".to_string()]),
        "application/x-ndjson",
    )
    .await;
    assert_eq!((status, counts(&v)), (200, (1, 0, 0)), "{v}");
    env.shutdown().await;
}

/// `?full=true` queues every member's value and `false` for who left, even values Braze was
/// sent lately: with the shipped update-only memberships, members whose profiles did not
/// exist at the first upload get their flag once the profiles exist.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_snapshot_queues_every_member_past_the_skip_of_unchanged_values() {
    let env = Env::start_with(|c| c.update_existing_only = Default::default()).await;
    let users: Vec<String> = (0..5).map(|i| format!("f{i}")).collect();
    let (status, v) = put(
        &env.base,
        PATH,
        ndjson(users.clone()),
        "application/x-ndjson",
    )
    .await;
    assert_eq!((status, counts(&v)), (200, (5, 0, 0)), "{v}");
    wait_for_stats(&env, Duration::from_secs(10), |s| {
        s["queue"]["pending"] == 0
    })
    .await;
    let fake = env.fake.clone();
    let held = |f: &fake_braze::FakeBraze| {
        users
            .iter()
            .filter(|u| {
                f.attribute_value(&format!("external_id:{u}"), "AIQ_1042_1")
                    .is_some()
            })
            .count()
    };
    // Update-only for users Braze has no profile for: answered 201, nothing stored.
    assert_eq!(held(&fake), 0);
    for u in &users {
        fake.create_profile(u);
    }
    // The same members again: a plain upload finds nothing to send...
    let (status, v) = put(
        &env.base,
        PATH,
        ndjson(users.clone()),
        "application/x-ndjson",
    )
    .await;
    assert_eq!((status, counts(&v)), (200, (0, 0, 5)), "{v}");
    // ...a full one sends every member (and `false` for f4, who left), skip or not.
    let full = format!("{PATH}?full=true");
    let (status, v) = put(
        &env.base,
        &full,
        ndjson(users[..4].to_vec()),
        "application/x-ndjson",
    )
    .await;
    assert_eq!(
        (status, counts(&v), &v["resent"]),
        (200, (0, 1, 4), &serde_json::json!(4)),
        "{v}"
    );
    assert!(
        wait_until(Duration::from_secs(10), || held(&fake) == 5).await,
        "{:?}",
        fake.attribute_state()
    );
    assert_eq!(
        fake.attribute_value("external_id:f4", "AIQ_1042_1"),
        Some(serde_json::json!(false))
    );
}
