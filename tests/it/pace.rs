//! Delivery at Braze's pace: against a Braze that answers slowly, the requests in flight grow
//! past where they start, every record still arrives once, and the limit shows in /metrics.

use std::time::{Duration, Instant};

use fake_braze::Behaviour;

use super::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn against_a_slow_braze_more_requests_go_in_flight_and_nothing_is_lost() {
    let env = Env::start().await;
    env.fake.set_behaviour(Behaviour::Hang {
        delay: Duration::from_millis(150),
        until: Instant::now() + Duration::from_secs(3600),
    });
    // 30,000 events: 400 requests of 75, about 60 s one at a time at 150 ms each.
    for chunk in 0..30u64 {
        let body: String = (0..1000)
            .map(|i| format!("{}\n", event(chunk * 1000 + i)))
            .collect();
        let (status, _) = env.post("/v1/events", body).await;
        assert_eq!(status, 202);
    }
    let started = Instant::now();
    let fake = env.fake.clone();
    assert!(
        wait_until(Duration::from_secs(60), || fake.events().len() >= 30_000).await,
        "{} of 30,000 events delivered",
        env.fake.events().len()
    );
    let took = started.elapsed();
    // The fake notes a request's arrival before its delay: the last answers are still on
    // their way. Once they are back, nothing is in flight.
    let mut metrics = String::new();
    for _ in 0..50 {
        metrics = env.metrics().await;
        if metric(&metrics, "aiq_braze_sync_delivery_in_flight") == 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let limit = metric(&metrics, "aiq_braze_sync_delivery_concurrency_limit");
    eprintln!("30,000 events in {took:?} at 150 ms a request; limit now {limit}");
    // It started at 8; a fixed 8 would have needed 400 / 8 × 150 ms = 7.5 s at best.
    assert!(limit > 8.0, "{metrics}");
    assert_eq!(
        metric(&metrics, "aiq_braze_sync_delivery_in_flight"),
        0.0,
        "{metrics}"
    );
    // Each event exactly once.
    let counts = event_counts(&env.fake);
    assert_eq!(counts.len(), 30_000);
    assert!(counts.values().all(|n| *n == 1));
}

/// Events during a backfill, with Braze answering in 200 ms and the rate paced (here by the
/// configured ceiling, which queues requests at the gate as Braze's own limit does): the
/// backfill fills the adaptive limit and the gate's queue, and each event still reaches Braze
/// within about one of Braze's answers of its 202, while the backfill is still going.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_go_ahead_of_a_paced_backfill_against_a_slow_braze() {
    let mut env = Env::start_with(|c| c.delivery.max_requests_per_second = Some(40.0)).await;
    env.fake.set_behaviour(Behaviour::Hang {
        delay: Duration::from_millis(200),
        until: Instant::now() + Duration::from_secs(3600),
    });
    // 30,000 memberships: 400 requests, ten seconds at 40 a second.
    for chunk in 0..6 {
        let body: Vec<_> = (0..5000)
            .map(|i| membership(&format!("bf-{chunk}-{i}"), "a1", "1", true))
            .collect();
        let (status, body) = env.post("/v1/memberships", array(&body)).await;
        assert_eq!(status, 202, "{body}");
    }
    // Let the limit grow and the gate's queue fill.
    tokio::time::sleep(Duration::from_secs(2)).await;

    let mut acked = std::collections::HashMap::new();
    for id in 0..20u64 {
        let (status, body) = env.post("/v1/events", array(&[event(id)])).await;
        assert_eq!(status, 202, "{body}");
        acked.insert(id, Instant::now());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let fake = env.fake.clone();
    assert!(
        wait_until(Duration::from_secs(10), || fake.events().len() >= 20).await,
        "{} of 20 events delivered",
        env.fake.events().len()
    );
    let waits: Vec<Duration> = env
        .fake
        .events_with_arrival()
        .into_iter()
        .map(|(at, e)| at - acked[&e["properties"]["id"].as_u64().unwrap()])
        .collect();
    let slowest = waits.iter().max().unwrap();
    let backfill_left = env.stats().await["queue"]["pending"].as_u64().unwrap();
    eprintln!("events reached Braze within {slowest:?} of their 202; {backfill_left} memberships still pending");
    assert!(
        backfill_left > 0,
        "the backfill had drained: the test proves nothing"
    );
    // Arrival is noted before Braze's 200 ms. An event worker that queued at the gate
    // behind the backfill's requests waiting for their turns of 25 ms took about 580 ms here.
    assert!(*slowest < Duration::from_millis(300), "{waits:?}");
    env.shutdown().await;
}
