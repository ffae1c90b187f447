use std::time::{Duration, Instant};

use fake_braze::Behaviour;
use serde_json::{json, Value};

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

/// "Set the attribute, then fire the trigger event": an event never reaches Braze in a request
/// earlier than an update of its user accepted before it, even when that update is behind a
/// backfill of other users in the attribute lane; and the event still does not wait for the
/// backfill (its user's update travels with it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_never_reaches_braze_before_an_earlier_update_of_its_user() {
    let env = Env::start_with(|c| c.delivery.workers = 4).await;
    env.fake.set_behaviour(Behaviour::FailStatus {
        status: 503,
        until: Instant::now() + Duration::from_secs(2),
    });
    // The backfill: 6,000 memberships of other users, ahead in the attribute lane.
    for part in 0..6 {
        let items: Vec<_> = (0..1000)
            .map(|i| membership(&format!("bf-{part}-{i}"), "77", "1", true))
            .collect();
        assert_eq!(env.post("/v1/memberships", array(&items)).await.0, 202);
    }
    // Then, per user, the attribute and the event it should trigger on.
    let users: Vec<String> = (0..20).map(|i| format!("x{i}")).collect();
    for (i, u) in users.iter().enumerate() {
        let attribute =
            array(&[json!({"external_id": u, "attributes": {"tier": format!("t{i}")}})]);
        assert_eq!(env.post("/v1/attributes", attribute).await.0, 202);
        let mut e = event(i as u64);
        e["external_id"] = json!(u);
        assert_eq!(env.post("/v1/events", array(&[e])).await.0, 202);
    }
    let fake = env.fake.clone();
    assert!(
        wait_until(Duration::from_secs(60), || {
            fake.events().len() >= 20 && fake.attributes().len() >= 6000 + 20
        })
        .await,
        "not everything arrived"
    );
    let arrivals = fake.arrivals();
    let request_of = |array: &str, user: &str| {
        arrivals
            .iter()
            .find(|(_, a, o)| *a == array && o["external_id"] == json!(user))
            .map(|(seq, _, _)| *seq)
            .unwrap_or_else(|| panic!("{array} of {user} never arrived"))
    };
    let last_backfill = arrivals
        .iter()
        .filter(|(_, a, o)| {
            *a == "attributes"
                && o["external_id"]
                    .as_str()
                    .is_some_and(|u| u.starts_with("bf-"))
        })
        .map(|(seq, _, _)| *seq)
        .max()
        .unwrap();
    for u in &users {
        let (attribute, event) = (request_of("attributes", u), request_of("events", u));
        assert!(
            attribute <= event,
            "{u}: the event arrived in request {event}, its earlier attribute in request {attribute}"
        );
        assert!(
            event < last_backfill,
            "{u}: the event waited for the backfill (request {event}, backfill ended at {last_backfill})"
        );
    }
}
