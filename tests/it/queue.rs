//! The queue against a real sled database in a temp dir, through its public API.

use std::sync::Arc;

use aiq_braze_sync::queue::{BatchLimits, Outcome, Queue, QueueError, QueueSettings};
use aiq_braze_sync::record::{Event, Record, UserId};

use crate::common::member;

fn settings(max_records: u64) -> QueueSettings {
    QueueSettings {
        max_records,
        max_disk_bytes: 1 << 40,
        cache_bytes: 8 << 20,
        compact_min_bytes: 1 << 30,
        min_free_bytes: 0,
    }
}

fn limits() -> BatchLimits {
    BatchLimits {
        max_objects: 75,
        per_array: false,
        max_bytes: 3_500_000,
    }
}

fn event(n: u32) -> Record {
    Record::Event(Event {
        user: UserId::Braze(format!("b{n}")),
        name: "e".into(),
        time: "2026-01-01T00:00:00.000Z".into(),
        properties: Some(format!("{{\"n\":{n}}}")),
    })
}

fn values(leased: &[aiq_braze_sync::queue::Leased]) -> Vec<bool> {
    leased
        .iter()
        .filter_map(|l| match &l.stored.record {
            Record::Membership(m) => Some(m.member),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn a_newer_membership_replaces_the_pending_one() {
    let dir = tempfile::tempdir().unwrap();
    let q = Queue::open(dir.path(), settings(100)).unwrap();
    q.enqueue(vec![member("u", true), member("u", false)])
        .await
        .unwrap();
    q.enqueue(vec![member("u", true)]).await.unwrap();
    assert_eq!(q.pending(), 1);
    assert_eq!(q.stats().unwrap().coalesced_total, 2);
    assert_eq!(values(&q.lease(&limits()).unwrap()), vec![true]);
}

#[tokio::test]
async fn no_update_is_leased_while_an_older_one_of_the_same_attribute_is_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let q = Queue::open(dir.path(), settings(100)).unwrap();
    q.enqueue(vec![member("u", true), member("v", true)])
        .await
        .unwrap();
    let first = q.lease(&limits()).unwrap();
    assert_eq!(first.len(), 2);
    q.enqueue(vec![member("u", false)]).await.unwrap();
    assert!(
        q.lease(&limits()).unwrap().is_empty(),
        "u's newer value must wait"
    );
    // The in-flight true fails: it is gone (superseded), and false is what goes next.
    q.complete(first.into_iter().map(|l| (l, Outcome::Retry)).collect())
        .unwrap();
    let next = q.lease(&limits()).unwrap();
    let users: Vec<_> = next
        .iter()
        .map(|l| {
            (
                l.stored.record.user().value().to_string(),
                values(std::slice::from_ref(l)),
            )
        })
        .collect();
    assert_eq!(
        users,
        vec![
            ("v".to_string(), vec![true]),
            ("u".to_string(), vec![false])
        ]
    );
    q.complete(next.into_iter().map(|l| (l, Outcome::Delivered)).collect())
        .unwrap();
    assert_eq!(q.pending(), 0);
}

#[tokio::test]
async fn leased_records_are_pending_again_after_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let q = Queue::open(dir.path(), settings(100)).unwrap();
    q.enqueue((0..10).map(event).collect()).await.unwrap();
    let leased = q.lease(&limits()).unwrap();
    assert_eq!(leased.len(), 10);
    // Five delivered, five still in flight when the process "dies".
    let (done, _lost): (Vec<_>, Vec<_>) = leased.into_iter().partition(|l| l.seq % 2 == 0);
    q.complete(done.into_iter().map(|l| (l, Outcome::Delivered)).collect())
        .unwrap();
    q.sync().await.unwrap();
    drop(q);
    let q = Queue::open(dir.path(), settings(100)).unwrap();
    assert_eq!(q.pending(), 5);
    let again = q.lease(&limits()).unwrap();
    assert!(again.iter().all(|l| l.seq % 2 == 1));
    // Sequence numbers keep growing across the reopen.
    q.enqueue(vec![event(99)]).await.unwrap();
    let newest = q.lease(&limits()).unwrap();
    assert!(newest[0].seq > 10);
}

#[tokio::test]
async fn a_refused_record_moves_to_the_dead_letters_with_its_reason() {
    let dir = tempfile::tempdir().unwrap();
    let q = Queue::open(dir.path(), settings(100)).unwrap();
    q.enqueue(vec![event(1), event(2)]).await.unwrap();
    let leased = q.lease(&limits()).unwrap();
    let results = leased
        .into_iter()
        .map(|l| {
            let o = if l.seq == 1 {
                Outcome::Dead("BLACKLISTED_EXTERNAL_USER_ID".into())
            } else {
                Outcome::Delivered
            };
            (l, o)
        })
        .collect();
    q.complete(results).unwrap();
    let s = q.stats().unwrap();
    assert_eq!((s.pending, s.dead), (0, 1));
}

#[tokio::test]
async fn past_its_bound_the_queue_refuses_the_whole_request() {
    let dir = tempfile::tempdir().unwrap();
    let q: Arc<Queue> = Queue::open(dir.path(), settings(5)).unwrap();
    q.enqueue((0..4).map(event).collect()).await.unwrap();
    let err = q.enqueue((0..2).map(event).collect()).await.unwrap_err();
    assert!(matches!(err, QueueError::Full(_)), "{err}");
    assert_eq!(q.pending(), 4);
    q.enqueue(vec![event(9)]).await.unwrap();
}

#[tokio::test]
async fn a_second_process_is_told_the_database_is_locked() {
    let dir = tempfile::tempdir().unwrap();
    let _q = Queue::open(dir.path(), settings(5)).unwrap();
    let err = Queue::open(dir.path(), settings(5))
        .err()
        .expect("second open fails");
    assert!(matches!(err, QueueError::Locked { .. }), "{err}");
}

#[tokio::test]
async fn an_update_braze_already_has_is_not_queued_again() {
    let dir = tempfile::tempdir().unwrap();
    let q = Queue::open(dir.path(), settings(100)).unwrap();
    q.enqueue(vec![member("u", true)]).await.unwrap();
    let leased = q.lease(&limits()).unwrap();
    q.complete(
        leased
            .into_iter()
            .map(|l| (l, Outcome::Delivered))
            .collect(),
    )
    .unwrap();

    // Same value again: Braze has it, nothing to send (and to bill).
    q.enqueue(vec![member("u", true)]).await.unwrap();
    assert_eq!(q.pending(), 0);
    assert_eq!(q.stats().unwrap().skipped_unchanged_total, 1);

    // A change is sent; and while it is in flight, going back to the old value is sent too,
    // since Braze will hold the new one by then.
    q.enqueue(vec![member("u", false)]).await.unwrap();
    let in_flight = q.lease(&limits()).unwrap();
    q.enqueue(vec![member("u", true)]).await.unwrap();
    assert_eq!(
        q.pending(),
        1,
        "the in-flight update is superseded, not skipped"
    );
    q.complete(
        in_flight
            .into_iter()
            .map(|l| (l, Outcome::Delivered))
            .collect(),
    )
    .unwrap();
    assert_eq!(values(&q.lease(&limits()).unwrap()), vec![true]);

    // What Braze has survives a reopen (it lives in the state database).
    drop(q);
    let q = Queue::open(dir.path(), settings(100)).unwrap();
    let leased = q.lease(&limits()).unwrap();
    q.complete(
        leased
            .into_iter()
            .map(|l| (l, Outcome::Delivered))
            .collect(),
    )
    .unwrap();
    q.enqueue(vec![member("u", true)]).await.unwrap();
    assert_eq!(q.pending(), 0);
}

#[tokio::test]
async fn a_snapshot_larger_than_memory_is_merged_from_sorted_runs() {
    let dir = tempfile::tempdir().unwrap();
    let q = Queue::open(dir.path(), settings(1_000_000)).unwrap();
    // 5,000 users in a scrambled order, each twice, sorted in runs of about 100 ids.
    let users: Vec<u64> = (0..5000u64).map(|i| (i * 7919) % 5000).collect();
    let mut upload = q.begin_snapshot("a", "1").unwrap().with_run_bytes(4096);
    for u in users.iter().chain(users.iter()) {
        upload.add(&UserId::External(format!("u{u}"))).unwrap();
    }
    let report = upload.finish(false).await.unwrap();
    assert_eq!(
        (
            report.entered,
            report.exited,
            report.unchanged,
            report.members
        ),
        (5000, 0, 0, 5000)
    );
    assert_eq!(q.pending(), 5000);

    // Half leave, 100 enter.
    let mut upload = q.begin_snapshot("a", "1").unwrap().with_run_bytes(4096);
    for u in (2500..5100u64).rev() {
        upload.add(&UserId::External(format!("u{u}"))).unwrap();
    }
    let report = upload.finish(false).await.unwrap();
    assert_eq!(
        (
            report.entered,
            report.exited,
            report.unchanged,
            report.members
        ),
        (100, 2500, 2500, 2600)
    );
    // Only the current generation's file remains.
    let files: Vec<_> = std::fs::read_dir(dir.path().join("snapshots/a.1"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(files.len(), 2, "{files:?}");
}

/// Queues each request's records in a fresh queue under `dir`, synced, and closes it.
async fn queued_on_disk(dir: &std::path::Path, requests: Vec<Vec<Record>>) {
    let q = Queue::open(dir, settings(100)).unwrap();
    for records in requests {
        q.enqueue(records).await.unwrap();
    }
    q.sync().await.unwrap();
}

/// Edits the closed queue's current generation with sled itself, as damage or an older
/// release would have left it.
fn edit_on_disk(dir: &std::path::Path, edit: impl FnOnce(&sled::Tree)) {
    let queue_dir = dir.join("queue");
    let generation = std::fs::read_to_string(queue_dir.join("CURRENT")).unwrap();
    let db = sled::open(queue_dir.join(generation.trim())).unwrap();
    edit(&db.open_tree("queue").unwrap());
    db.flush().unwrap();
}

/// Leases and completes until nothing is left; returns the seqs in the order leased.
fn drain(q: &Queue, outcome: impl Fn() -> Outcome) -> Vec<u64> {
    let mut seen = Vec::new();
    loop {
        let leased = q.lease(&limits()).unwrap();
        if leased.is_empty() {
            return seen;
        }
        seen.extend(leased.iter().map(|l| l.seq));
        q.complete(leased.into_iter().map(|l| (l, outcome())).collect())
            .unwrap();
    }
}

/// A stored record whose bytes no longer decode (a bit flip, a downgrade) is moved to the
/// dead letters with the reason instead of wedging the queue; the records around it flow.
#[tokio::test]
async fn a_record_that_no_longer_decodes_is_moved_aside_not_wedging_the_queue() {
    use aiq_braze_sync::queue::format;
    let dir = tempfile::tempdir().unwrap();
    queued_on_disk(dir.path(), vec![vec![event(1), event(2), event(3)]]).await;
    // Damage record 2 in the real database. The three events share one chunk (under the
    // first one's seq); record 2's envelope inside it gets an unknown version.
    edit_on_disk(dir.path(), |tree| {
        let key = format::record_key(format::LANE_EVENTS, 1);
        let chunk = tree.get(key).unwrap().expect("the chunk of events 1-3");
        let entries = format::event_entries(1, &chunk).unwrap();
        assert_eq!(entries.iter().map(|e| e.0).collect::<Vec<_>>(), [1, 2, 3]);
        let garbage = [9u8, 1, 2, 3];
        let damaged = format::encode_event_chunk(
            1,
            entries
                .iter()
                .map(|&(seq, e)| (seq, if seq == 2 { &garbage[..] } else { e }))
                .collect::<Vec<_>>()
                .into_iter(),
        );
        tree.insert(key, damaged).unwrap();
    });
    let q = Queue::open(dir.path(), settings(100)).unwrap();
    let leased = q.lease(&limits()).unwrap();
    let seqs: Vec<u64> = leased.iter().map(|l| l.seq).collect();
    assert_eq!(seqs, vec![1, 3]);
    q.complete(
        leased
            .into_iter()
            .map(|l| (l, Outcome::Delivered))
            .collect(),
    )
    .unwrap();
    let s = q.stats().unwrap();
    assert_eq!((s.pending, s.dead), (0, 1));
    let dead = q.dead(10).unwrap();
    assert_eq!(dead[0].id, 2);
    assert_eq!(dead[0].kind, "undecodable");
    assert!(
        dead[0]
            .reason
            .as_deref()
            .unwrap_or("")
            .contains("unknown format version 9"),
        "{:?}",
        dead[0]
    );
}

/// An event chunk whose framing is damaged (its count claims more entries than it holds) is
/// moved aside whole, under its first seq, and counted out by what it claimed; the next
/// request's events still flow.
#[tokio::test]
async fn an_event_chunk_that_no_longer_frames_is_moved_aside_whole() {
    use aiq_braze_sync::queue::format;
    let dir = tempfile::tempdir().unwrap();
    queued_on_disk(
        dir.path(),
        vec![vec![event(1), event(2), event(3)], vec![event(4), event(5)]],
    )
    .await;
    edit_on_disk(dir.path(), |tree| {
        let key = format::record_key(format::LANE_EVENTS, 1);
        let mut chunk = tree.get(key).unwrap().unwrap().to_vec();
        assert_eq!(chunk[0], format::EVENT_CHUNK_V1);
        // Cut the value short: the header still says three entries.
        chunk.truncate(chunk.len() - 10);
        tree.insert(key, chunk).unwrap();
    });
    let q = Queue::open(dir.path(), settings(100)).unwrap();
    assert_eq!(q.stats().unwrap().pending, 5);
    let leased = q.lease(&limits()).unwrap();
    let seqs: Vec<u64> = leased.iter().map(|l| l.seq).collect();
    assert_eq!(seqs, vec![4, 5]);
    let s = q.stats().unwrap();
    assert_eq!((s.pending, s.dead), (2, 1));
    let dead = q.dead(10).unwrap();
    assert_eq!((dead[0].id, dead[0].kind.as_str()), (1, "undecodable"));
    assert!(
        dead[0]
            .reason
            .as_deref()
            .unwrap_or("")
            .contains("event chunk"),
        "{:?}",
        dead[0]
    );
}

/// Events of one request share a chunk; delivering some of them and retrying the others
/// keeps exactly the others, across a reopen, and they are leased again in order.
#[tokio::test]
async fn part_of_an_event_chunk_delivered_leaves_exactly_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    {
        let q = Queue::open(dir.path(), settings(1000)).unwrap();
        q.enqueue((1..=200).map(event).collect()).await.unwrap();
        let leased = q.lease(&limits()).unwrap();
        assert_eq!(leased.len(), 75);
        // Deliver the odd ones, retry the even ones, dead-letter number 7.
        q.complete(
            leased
                .into_iter()
                .map(|l| {
                    let outcome = match l.seq {
                        7 => Outcome::Dead("refused".into()),
                        s if s % 2 == 1 => Outcome::Delivered,
                        _ => Outcome::Retry,
                    };
                    (l, outcome)
                })
                .collect(),
        )
        .unwrap();
        let s = q.stats().unwrap();
        assert_eq!((s.pending, s.dead), (200 - 38, 1));
        q.sync().await.unwrap();
    }
    let q = Queue::open(dir.path(), settings(1000)).unwrap();
    assert_eq!(q.stats().unwrap().pending, 162);
    let seen = drain(&q, || Outcome::Delivered);
    let expected: Vec<u64> = (1..=200).filter(|s| *s > 75 || s % 2 == 0).collect();
    assert_eq!(seen, expected);
    assert_eq!(q.stats().unwrap().pending, 0);
    assert_eq!(q.dead(10).unwrap()[0].id, 7);
}

/// Dead-lettered events retried in bulk (more than one sub-batch, so several chunks) and
/// refused again are all back in the dead letters, with the counts in step.
#[tokio::test]
async fn dead_events_retried_and_refused_again_are_all_dead_again() {
    use aiq_braze_sync::queue::Selection;
    let dir = tempfile::tempdir().unwrap();
    let q = Queue::open(dir.path(), settings(100_000)).unwrap();
    for round in 0..3 {
        if round == 0 {
            q.enqueue((1..=3000).map(event).collect()).await.unwrap();
        } else {
            let r = q.retry_dead(&Selection::All).await.unwrap();
            assert_eq!(r.retried.len(), 3000);
        }
        drain(&q, || Outcome::Dead("no".into()));
        let s = q.stats().unwrap();
        assert_eq!((s.pending, s.dead), (0, 3000));
        assert_eq!(q.dead(100_000).unwrap().len(), 3000);
    }
}

/// A release from before event chunks moves a chunk it cannot read to the dead letters whole.
/// After upgrading again, `retry-dead` puts its events back, each in the queue.
#[tokio::test]
async fn a_dead_letter_holding_a_whole_chunk_is_retried_event_by_event() {
    use aiq_braze_sync::queue::{format, Selection};
    let dir = tempfile::tempdir().unwrap();
    queued_on_disk(dir.path(), vec![vec![event(1), event(2), event(3)]]).await;
    // What the older release's quarantine wrote.
    edit_on_disk(dir.path(), |tree| {
        let key = format::record_key(format::LANE_EVENTS, 1);
        let chunk = tree.remove(key).unwrap().unwrap();
        let dead = format::Dead {
            dead_at_ms: 1,
            attempts: 0,
            reason: "undecodable stored record: unknown format version 3".into(),
            stored: chunk.to_vec(),
        };
        tree.insert(format::dead_key(1), format::encode_dead(&dead))
            .unwrap();
        tree.insert(format::META_COUNTS, &format::encode_counts(0, 0, 1)[..])
            .unwrap();
    });
    let q = Queue::open(dir.path(), settings(100)).unwrap();
    assert_eq!(
        (q.stats().unwrap().pending, q.stats().unwrap().dead),
        (0, 1)
    );
    let report = q.retry_dead(&Selection::All).await.unwrap();
    assert_eq!(report.retried, vec![1]);
    let s = q.stats().unwrap();
    assert_eq!((s.pending, s.dead), (3, 0));
    let leased = q.lease(&limits()).unwrap();
    let records: Vec<_> = leased.iter().map(|l| l.stored.record.clone()).collect();
    assert_eq!(records, vec![event(1), event(2), event(3)]);
}
