use std::time::{Duration, Instant};

use fake_braze::Behaviour;

use crate::common::*;

/// Braze answers 503 for a stretch, then 429 with Retry-After for another: every accepted
/// record arrives afterwards, and no request is sent inside a Retry-After window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_survive_a_503_stretch_and_a_429_stretch_and_retry_after_is_honoured() {
    let mut env = Env::start().await;
    let t0 = Instant::now();
    env.fake.set_behaviour(Behaviour::FailStatus {
        status: 503,
        until: t0 + Duration::from_secs(2),
    });
    let mut next = 0u64;
    for _ in 0..10 {
        let batch: Vec<_> = (next..next + 200).map(event).collect();
        next += 200;
        let (status, body) = env.post("/v1/events", array(&batch)).await;
        assert_eq!(status, 202, "{body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Still in the 503 stretch: nothing delivered yet, everything pending.
    let pending = env.stats().await["queue"]["pending"].as_u64().unwrap();
    assert!(pending > 0);
    assert!(env.fake.events().is_empty());

    let fake = env.fake.clone();
    assert!(
        wait_until(Duration::from_secs(10), || Instant::now()
            > t0 + Duration::from_secs(2))
        .await
    );
    env.fake.set_behaviour(Behaviour::RateLimited {
        retry_after: Duration::from_secs(1),
        until: Instant::now() + Duration::from_secs(3),
    });
    for _ in 0..5 {
        let batch: Vec<_> = (next..next + 200).map(event).collect();
        next += 200;
        let (status, _) = env.post("/v1/events", array(&batch)).await;
        assert_eq!(status, 202);
    }
    let total = next as usize;
    assert!(
        wait_until(Duration::from_secs(60), || event_counts(&fake).len()
            == total)
        .await,
        "only {} of {total} arrived",
        event_counts(&fake).len()
    );

    let requests = fake.requests();
    let statuses: Vec<u16> = requests.iter().map(|r| r.status).collect();
    assert!(
        statuses.contains(&503) && statuses.contains(&429),
        "{statuses:?}"
    );
    // A request that was already on the wire when a 429 went out may land just after it;
    // anything later than this grace inside the window is a violation.
    let grace = Duration::from_millis(200);
    for limited in requests.iter().filter(|r| r.status == 429) {
        let window = limited.retry_after.expect("429 carries Retry-After");
        for r in &requests {
            let inside = r.at > limited.at + grace && r.at < limited.at + window;
            assert!(
                !inside,
                "a request came {:?} after a 429 asking for {window:?}",
                r.at - limited.at
            );
        }
    }
    // While failing, one probe at a time: the 503 stretch costs a handful of requests per
    // backoff step, not one per worker per millisecond.
    let failures = statuses.iter().filter(|s| **s == 503).count();
    assert!(failures < 60, "{failures} requests during a 2 s outage");
    let stats = env.stats().await;
    assert_eq!(stats["queue"]["pending"], 0);
    assert_eq!(stats["queue"]["dead"], 0);
    env.shutdown().await;
}
