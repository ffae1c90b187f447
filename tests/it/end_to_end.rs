use std::collections::HashMap;
use std::time::Duration;

use crate::common::*;

/// 10,000 memberships and 10,000 events accepted over HTTP all reach Braze exactly once,
/// with the right attribute names and values, and no request over Braze's limits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_accepted_record_reaches_braze_exactly_once_within_its_limits() {
    let mut env = Env::start().await;
    let mut expected: HashMap<(String, String), bool> = HashMap::new();
    let memberships: Vec<_> = (0..10_000u64)
        .map(|i| {
            let user = format!("u{}", i % 2500);
            let (aud, split) = (format!("aud{}", i / 2500), "1".to_string());
            let member = i % 3 != 0;
            expected.insert((user.clone(), format!("AIQ_{aud}_{split}")), member);
            membership(&user, &aud, &split, member)
        })
        .collect();
    let events: Vec<_> = (0..10_000).map(event).collect();
    for chunk in memberships.chunks(500) {
        let (status, body) = env.post("/v1/memberships", array(chunk)).await;
        assert_eq!(status, 202, "{body}");
        assert_eq!(body["accepted"], 500);
    }
    // Events as NDJSON, the other accepted form.
    for chunk in events.chunks(500) {
        let ndjson: String = chunk.iter().map(|e| format!("{e}\n")).collect();
        let (status, body) = env.post("/v1/events", ndjson).await;
        assert_eq!(status, 202, "{body}");
    }

    let fake = env.fake.clone();
    let all_there = wait_until(Duration::from_secs(60), || {
        fake.events().len() >= 10_000 && fake.attribute_state().len() >= 10_000
    })
    .await;
    assert!(
        all_there,
        "not everything arrived: {} events",
        fake.events().len()
    );
    // Let any stray duplicate show itself before counting.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let counts = event_counts(&fake);
    assert_eq!(counts.len(), 10_000);
    assert!(counts.values().all(|&n| n == 1), "an event arrived twice");

    let mut writes: HashMap<(String, String), usize> = HashMap::new();
    for obj in fake.attributes() {
        let user = obj["external_id"].as_str().unwrap().to_string();
        for (k, _) in obj
            .as_object()
            .unwrap()
            .iter()
            .filter(|(k, _)| k.starts_with("AIQ_"))
        {
            *writes.entry((user.clone(), k.clone())).or_default() += 1;
        }
    }
    assert_eq!(writes.len(), expected.len());
    assert!(
        writes.values().all(|&n| n == 1),
        "an attribute was written twice"
    );
    let held = fake.attribute_state();
    for ((user, attr), member) in &expected {
        let value = held.get(&(format!("external_id:{user}"), attr.clone()));
        assert_eq!(
            value,
            Some(&serde_json::Value::Bool(*member)),
            "{user} {attr}"
        );
    }

    let requests = fake.requests();
    assert!(requests
        .iter()
        .all(|r| r.status == 201 && r.objects <= 75 && r.body_bytes < 4 << 20));
    // Four memberships of one user travel as one attributes object.
    assert!(
        requests.len() < 20_000 / 75 + 60,
        "{} requests",
        requests.len()
    );

    let stats = env.stats().await;
    assert_eq!(stats["queue"]["pending"], 0);
    assert_eq!(stats["queue"]["dead"], 0);
    assert_eq!(stats["delivery"]["records_delivered"], 20_000);
    env.shutdown().await;
}

/// A token is required when configured, and health endpoints answer without one.
#[tokio::test]
async fn ingest_without_the_token_is_refused_and_queues_nothing() {
    let mut env = Env::start().await;
    let r = env
        .client
        .post(format!("{}/v1/events", env.base))
        .bearer_auth("wrong")
        .body(array(&[event(1)]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = env
        .client
        .post(format!("{}/v1/events", env.base))
        .body(array(&[event(1)]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = env
        .client
        .get(format!("{}/healthz", env.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = env
        .client
        .get(format!("{}/readyz", env.base))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(env.stats().await["queue"]["accepted_total"], 0);
    env.shutdown().await;
}

/// A record Braze refuses for itself (201 with `errors`) goes to the dead letters with
/// Braze's reason; the rest of its batch is delivered and nothing is retried for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_braze_refuses_alone_is_dead_lettered_and_the_rest_delivered() {
    let mut env = Env::start().await;
    env.fake.reject_ids(["user-3".to_string()]);
    let events: Vec<_> = (0..50).map(event).collect(); // user-3 is event 3's user
    let (status, _) = env.post("/v1/events", array(&events)).await;
    assert_eq!(status, 202);
    let fake = env.fake.clone();
    assert!(wait_until(Duration::from_secs(20), || fake.events().len() == 49).await);
    let mut stats = env.stats().await;
    for _ in 0..50 {
        if stats["queue"]["pending"] == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        stats = env.stats().await;
    }
    assert_eq!(stats["queue"]["dead"], 1, "{stats}");
    assert_eq!(stats["queue"]["pending"], 0);
    assert!(!event_counts(&fake).contains_key(&3));
    assert_eq!(fake.requests().len(), 1, "a refused record is not retried");
    env.shutdown().await;
}

/// `POST /users/export/ids` is forwarded to Braze as it came, with the real key, and Braze's
/// answer comes back as it was: a Braze client checking users through the daemon still works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_users_export_ids_lookup_is_forwarded_to_braze_and_answered_as_braze_answered() {
    // Off by default: the lookup is a 404 and never reaches Braze.
    let mut off = Env::start().await;
    let lookup = r#"{"external_ids":["u1"],"fields_to_export":["external_id"]}"#;
    let (status, answer) = off.post("/users/export/ids", lookup).await;
    assert_eq!(status, 404, "{answer}");
    assert!(
        answer["message"]
            .as_str()
            .unwrap()
            .contains("export_passthrough"),
        "{answer}"
    );
    assert!(off.fake.export_requests().is_empty());
    off.shutdown().await;

    let mut env = Env::start_with(|c| c.ingest.export_passthrough = true).await;
    // Make "u1" known to Braze first.
    let (status, _) = env
        .post(
            "/v1/memberships",
            array(&[membership("u1", "a", "1", true)]),
        )
        .await;
    assert_eq!(status, 202);
    let fake = env.fake.clone();
    assert!(wait_until(Duration::from_secs(10), || !fake.attributes().is_empty()).await);

    let body =
        serde_json::json!({"external_ids": ["u1", "nobody"], "fields_to_export": ["external_id"]});
    let (status, answer) = env.post("/users/export/ids", body.to_string()).await;
    assert!((200..300).contains(&status), "{status} {answer}");
    assert_eq!(answer["message"], "success", "{answer}");
    assert_eq!(
        answer["invalid_user_ids"],
        serde_json::json!(["nobody"]),
        "{answer}"
    );
    assert_eq!(fake.export_requests().len(), 1);

    // More than Braze's 50 ids a lookup is refused here.
    let many: Vec<String> = (0..51).map(|i| format!("u{i}")).collect();
    let body = serde_json::json!({"external_ids": many, "fields_to_export": ["external_id"]});
    let (status, _) = env.post("/users/export/ids", body.to_string()).await;
    assert_eq!(status, 400);
    assert_eq!(fake.export_requests().len(), 1);
    // Braze's refusals come back as they were (fields_to_export is mandatory).
    let (status, _) = env
        .post("/users/export/ids", r#"{"external_ids":["u1"]}"#)
        .await;
    assert_eq!(status, 400);
    // And the daemon's own token guards it.
    let r = env
        .client
        .post(format!("{}/users/export/ids", env.base))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    env.shutdown().await;
}

/// Past the queue's bound ingest answers 503 with Retry-After and queues nothing of that
/// request; what was accepted before is kept and delivered, and ingest recovers once it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_bound_ingest_answers_503_and_loses_nothing_accepted() {
    use fake_braze::Behaviour;
    let mut env = Env::start_with(|c| c.queue.max_records = 100).await;
    env.fake.set_behaviour(Behaviour::FailStatus {
        status: 503,
        until: std::time::Instant::now() + Duration::from_secs(3600),
    });
    let (status, _) = env
        .post("/v1/events", array(&(0..80).map(event).collect::<Vec<_>>()))
        .await;
    assert_eq!(status, 202);
    let r = env
        .client
        .post(format!("{}/v1/events", env.base))
        .bearer_auth(TOKEN)
        .body(array(&(80..120).map(event).collect::<Vec<_>>()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert!(r.headers().get("retry-after").is_some());
    assert_eq!(env.stats().await["queue"]["pending"], 80);

    env.fake.set_behaviour(Behaviour::Accept);
    let fake = env.fake.clone();
    assert!(wait_until(Duration::from_secs(20), || event_counts(&fake).len() == 80).await);
    let mut status = 0;
    for _ in 0..100 {
        status = env
            .post(
                "/v1/events",
                array(&(80..120).map(event).collect::<Vec<_>>()),
            )
            .await
            .0;
        if status == 202 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status, 202, "ingest recovers once the queue drains");
    assert!(wait_until(Duration::from_secs(20), || event_counts(&fake).len() == 120).await);
    env.shutdown().await;
}

/// Without the token a request is refused before its body is read: a client that announces
/// 50 MB and sends none of it gets its 401 at once, on every guarded endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_without_the_token_is_refused_before_its_body_is_read() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let env = Env::start().await;
    let addr = env.base.trim_start_matches("http://").to_string();
    for (method, path, shape) in [
        ("POST", "/v1/events", "\"error\""),
        ("POST", "/users/track", "\"message\":\"Invalid API key\""),
        ("PUT", "/v1/audiences/1/splits/1/members", "\"error\""),
    ] {
        let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer wrong\r\nContent-Type: application/json\r\nContent-Length: 50000000\r\n\r\n"
        );
        s.write_all(head.as_bytes()).await.unwrap();
        let mut answer = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut answer))
            .await
            .unwrap_or_else(|_| panic!("{path}: no answer while the body was withheld"))
            .unwrap();
        let text = String::from_utf8_lossy(&answer[..n]);
        assert!(text.starts_with("HTTP/1.1 401"), "{path}: {text}");
        assert!(text.contains(shape), "{path}: {text}");
    }
    let stats = env.stats().await;
    assert_eq!(stats["queue"]["accepted_total"], 0);
}

/// A web page cannot use a browser to reach the daemon: a request carrying an `Origin` is
/// refused unless listed, and so is one whose `Host` is a DNS name pointed at this machine
/// (DNS rebinding) unless listed; the token changes neither. Nothing refused is queued.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_origins_and_rebound_host_names_are_refused_unless_listed() {
    let env = Env::start_with(|c| {
        c.ingest.allowed_origins = vec!["https://ops.example.com".into()];
        c.ingest.allowed_hosts = vec!["sync.internal".into()];
    })
    .await;
    let url = format!("{}/v1/events", env.base);
    let post = |origin: Option<&'static str>, host: Option<&'static str>| {
        let mut request = env
            .client
            .post(&url)
            .bearer_auth(TOKEN)
            .header("content-type", "application/json")
            .body(array(&[event(1)]));
        if let Some(o) = origin {
            request = request.header("origin", o);
        }
        if let Some(h) = host {
            request = request.header("host", h);
        }
        async move { request.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(post(Some("https://evil.example"), None).await, 403);
    assert_eq!(post(Some("null"), None).await, 403);
    assert_eq!(post(None, Some("rebound.evil.example:8080")).await, 403);
    assert_eq!(env.stats().await["queue"]["accepted_total"], 0);
    assert_eq!(post(Some("https://ops.example.com"), None).await, 202);
    assert_eq!(post(None, Some("sync.internal:8080")).await, 202);
    assert_eq!(post(None, Some("localhost:8080")).await, 202);
    assert_eq!(post(None, None).await, 202);
    // The admin API (personal data in peek and dead) is behind the same checks.
    let peek = env
        .client
        .get(format!("{}/v1/admin/queue/peek", env.base))
        .bearer_auth(TOKEN)
        .header("origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    assert_eq!(peek.status(), 403);
}
