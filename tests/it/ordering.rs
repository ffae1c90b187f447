use std::time::{Duration, Instant};

use fake_braze::Behaviour;
use serde_json::Value;

use crate::common::*;

/// Users' memberships flip true/false many times while Braze fails, hangs past the client's
/// timeout and recovers, with several workers: each ends with the last accepted value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_last_accepted_membership_is_what_braze_ends_with_under_retries() {
    let mut env = Env::start_with(|c| {
        c.delivery.workers = 8;
        c.braze.request_timeout = Duration::from_millis(300);
    })
    .await;
    let users: Vec<String> = (0..20).map(|i| format!("flip-{i}")).collect();
    let mut last = vec![false; users.len()];
    let start = Instant::now();
    for round in 0..60u32 {
        // Every few rounds Braze misbehaves in a different way.
        match round % 15 {
            3 => env.fake.set_behaviour(Behaviour::FailStatus {
                status: 503,
                until: Instant::now() + Duration::from_millis(150),
            }),
            7 => env.fake.set_behaviour(Behaviour::Hang {
                delay: Duration::from_millis(400),
                until: Instant::now() + Duration::from_millis(200),
            }),
            11 => env.fake.set_behaviour(Behaviour::RateLimited {
                retry_after: Duration::from_millis(500),
                until: Instant::now() + Duration::from_millis(100),
            }),
            _ => {}
        }
        let mut batch = Vec::new();
        for (i, u) in users.iter().enumerate() {
            // Each user flips a different pattern; some twice within one request.
            let value = (round + i as u32).is_multiple_of(2);
            batch.push(membership(u, "aud", "1", value));
            if round % 4 == i as u32 % 4 {
                batch.push(membership(u, "aud", "1", !value));
                last[i] = !value;
            } else {
                last[i] = value;
            }
        }
        let (status, body) = env.post("/v1/memberships", array(&batch)).await;
        assert_eq!(status, 202, "{body}");
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    let fake = env.fake.clone();
    let settled = wait_until(Duration::from_secs(60), || {
        users.iter().zip(&last).all(|(u, v)| {
            fake.attribute_value(&format!("external_id:{u}"), "AIQ_aud_1") == Some(Value::Bool(*v))
        })
    })
    .await;
    // And it stays that way once the queue is empty (no late stale write).
    let mut quiet = false;
    for _ in 0..100 {
        if env.stats().await["queue"]["pending"] == 0 {
            quiet = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(quiet, "queue never drained");
    tokio::time::sleep(Duration::from_millis(600)).await;
    for (u, v) in users.iter().zip(&last) {
        assert_eq!(
            fake.attribute_value(&format!("external_id:{u}"), "AIQ_aud_1"),
            Some(Value::Bool(*v)),
            "{u} after {:?}",
            start.elapsed()
        );
    }
    assert!(settled);
    // The faults did happen (which ones a short run meets depends on timing).
    let statuses: Vec<u16> = fake.requests().iter().map(|r| r.status).collect();
    assert!(statuses.iter().any(|s| *s != 201), "{statuses:?}");
    env.shutdown().await;
}
