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
    let metrics = env
        .client
        .get(format!("{}/metrics", env.base))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let value = |name: &str| -> f64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /metrics"))
    };
    let limit = value("aiq_delivery_concurrency_limit");
    eprintln!("30,000 events in {took:?} at 150 ms a request; limit now {limit}");
    // It started at 8; a fixed 8 would have needed 400 / 8 × 150 ms = 7.5 s at best.
    assert!(limit > 8.0, "{metrics}");
    assert_eq!(value("aiq_delivery_in_flight"), 0.0);
    // Each event exactly once.
    let counts = event_counts(&env.fake);
    assert_eq!(counts.len(), 30_000);
    assert!(counts.values().all(|n| *n == 1));
}
