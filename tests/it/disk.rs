use std::time::{Duration, Instant};

use aiq_braze_sync::fake_braze::Behaviour;

use crate::common::*;

/// A backlog fills the queue while Braze is down; once it drains, the daemon rebuilds the
/// queue database by itself and the directory shrinks to near its live size. Every record is
/// delivered exactly once, including those posted while the rebuild happened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_space_comes_back_after_a_backlog_drains() {
    let mut env = Env::start_with(|c| {
        c.queue.compact_min_bytes = 4 << 20;
    })
    .await;
    env.fake.set_behaviour(Behaviour::FailStatus {
        status: 503,
        until: Instant::now() + Duration::from_secs(3600),
    });
    let backlog = 80_000u64;
    for start in (0..backlog).step_by(1000) {
        let batch: Vec<_> = (start..start + 1000).map(event).collect();
        let (status, body) = env.post("/v1/events", array(&batch)).await;
        assert_eq!(status, 202, "{body}");
    }
    let full = dir_bytes(&env.data_dir());
    let stats = env.stats().await;
    assert_eq!(stats["queue"]["pending"], backlog);
    assert_eq!(stats["queue"]["generation"], 1);

    env.fake.set_behaviour(Behaviour::Accept);
    // Keep a trickle of ingest going through the drain and the rebuild; a 503 with
    // Retry-After during the rebuild is allowed, a loss is not.
    let mut next = backlog;
    let mut refused = 0;
    let fake = env.fake.clone();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let batch: Vec<_> = (next..next + 10).map(event).collect();
        let (status, _) = env.post("/v1/events", array(&batch)).await;
        match status {
            202 => next += 10,
            503 => refused += 1,
            s => panic!("ingest answered {s} during the drain"),
        }
        let s = env.stats().await;
        if s["queue"]["compactions_total"].as_u64() >= Some(1) && s["queue"]["pending"] == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "no rebuild after the drain: {s}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let total = next as usize;
    assert!(
        wait_until(Duration::from_secs(30), || event_counts(&fake).len()
            == total)
        .await
    );
    let after = dir_bytes(&env.data_dir());
    let counts = event_counts(&fake);
    assert!(
        counts.values().all(|&n| n == 1),
        "a record was delivered twice"
    );
    eprintln!("queue directory: {full} bytes with {backlog} pending, {after} after the drain; {refused} ingest requests got 503 during the rebuild");
    assert!(
        after * 4 < full,
        "directory did not shrink: {full} -> {after}"
    );
    assert!(env.stats().await["queue"]["generation"].as_u64() >= Some(2));
    env.shutdown().await;

    // The rebuilt queue opens again, empty, in its new generation.
    let fake2 = aiq_braze_sync::fake_braze::FakeBraze::start(API_KEY)
        .await
        .unwrap();
    let cfg = config(env.dir.path(), &fake2);
    let q = aiq_braze_sync::daemon::open_queue(&cfg)
        .await
        .map_err(|e| format!("{e:#}"))
        .unwrap();
    assert_eq!(q.pending(), 0);
    let generations: Vec<_> = std::fs::read_dir(env.data_dir().join("queue"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("gen-"))
        .collect();
    assert_eq!(generations.len(), 1, "old generations are deleted");
}
