//! The event log's open and drain on an arbitrary segment file: what is on disk may be torn
//! or damaged, and the queue must open, hand out what still reads, move the rest to the dead
//! letters, and be empty once everything is settled, without a panic or a loop.
//!
//! The input is written as the only segment of an empty queue. Random bytes rarely make a
//! sound frame, so seed the corpus with real segments (the README says how); mutations of
//! those reach the torn-tail, bad-checksum and damaged-header paths.
#![no_main]

use aiq_braze_sync::queue::{BatchLimits, Outcome, Queue, QueueSettings};
use libfuzzer_sys::fuzz_target;

fn settings() -> QueueSettings {
    QueueSettings {
        max_records: 1 << 40,
        max_disk_bytes: 1 << 40,
        cache_bytes: 1 << 20,
        compact_min_bytes: 1 << 40,
        min_free_bytes: 0,
        skip_unchanged_for: Some(std::time::Duration::from_secs(604_800)),
    }
}

fuzz_target!(|data: &[u8]| {
    let dir = tempfile::tempdir().expect("temp dir");
    let events = dir.path().join("queue").join("events");
    std::fs::create_dir_all(&events).expect("events dir");
    std::fs::write(events.join("0000000001.seg"), data).expect("segment");

    let Ok(queue) = Queue::open(dir.path(), settings()) else {
        return;
    };
    let limits = BatchLimits {
        max_objects: 75,
        per_array: false,
        max_bytes: 4 << 20,
    };
    // Every lease takes at least one event or finds none, and a frame holds at most a few
    // thousand: a drain that goes on past this is a loop.
    for _ in 0..=data.len() {
        let leased = queue.lease_lanes(&limits, false).expect("lease");
        if leased.is_empty() {
            break;
        }
        let dead = leased.len() % 2 == 0;
        let outcomes = leased
            .into_iter()
            .map(|l| {
                let o = if dead {
                    Outcome::Dead("fuzz".into())
                } else {
                    Outcome::Delivered
                };
                (l, o)
            })
            .collect();
        queue.complete(outcomes).expect("complete");
    }
    let stats = queue.stats().expect("stats");
    assert_eq!(stats.pending_events, 0, "events left after the drain");
    drop(queue);
    // What left stays gone. sled lets go of its lock a moment after the drop (the queue
    // tests' `reopen` says why); a lock never released fails here.
    let started = std::time::Instant::now();
    let queue = loop {
        match Queue::open(dir.path(), settings()) {
            Err(aiq_braze_sync::queue::QueueError::Locked { .. })
                if started.elapsed() < std::time::Duration::from_secs(5) =>
            {
                std::thread::sleep(std::time::Duration::from_millis(1))
            }
            other => break other.expect("reopen"),
        }
    };
    assert_eq!(
        queue.stats().expect("stats").pending_events,
        0,
        "events back after a reopen"
    );
});
