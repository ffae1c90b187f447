//! The queue against a real sled database in a temp dir, through its public API.

use std::sync::Arc;

use aiq_braze_sync::queue::{BatchLimits, Outcome, Queue, QueueError, QueueSettings};
use aiq_braze_sync::record::{Event, Record, UserId};
use aiq_braze_sync::snapshot::{SnapshotError, Snapshots};

use crate::common::member;

fn settings(max_records: u64) -> QueueSettings {
    QueueSettings {
        max_records,
        max_disk_bytes: 1 << 40,
        cache_bytes: 8 << 20,
        compact_min_bytes: 1 << 30,
        min_free_bytes: 0,
        skip_unchanged_for: Some(std::time::Duration::from_secs(604_800)),
        accept_loss: false,
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
    Record::Event(Event::new(
        UserId::Braze(format!("b{n}")),
        "e",
        "2026-01-01T00:00:00.000Z",
        Some(&format!("{{\"n\":{n}}}")),
    ))
}

fn values(leased: &[aiq_braze_sync::queue::Leased]) -> Vec<bool> {
    members(leased)
        .into_iter()
        .map(|(_, member)| member)
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

/// The user behind each leased membership, and the value it carries.
fn members(leased: &[aiq_braze_sync::queue::Leased]) -> Vec<(String, bool)> {
    leased
        .iter()
        .filter_map(|l| match &l.stored.record {
            Record::Membership(m) => Some((m.user.value().to_string(), m.member)),
            _ => None,
        })
        .collect()
}

/// A lease starts past the updates other leases hold; this checks it never starts past one
/// that is free: handed back for a retry, or left behind while its attribute was in flight.
#[tokio::test]
async fn membership_leases_come_back_for_what_is_handed_back_or_was_waiting() {
    let dir = tempfile::tempdir().unwrap();
    let q = Queue::open(dir.path(), settings(1000)).unwrap();
    let users: Vec<String> = (0..150).map(|n| format!("u{n}")).collect();
    q.enqueue(users.iter().map(|u| member(u, true)).collect())
        .await
        .unwrap();
    let a = q.lease(&limits()).unwrap();
    let b = q.lease(&limits()).unwrap();
    assert_eq!((a.len(), b.len()), (75, 75));
    assert_eq!(members(&a)[0].0, "u0");
    assert_eq!(members(&b)[0].0, "u75");

    // A newer value for u10, whose older one is out with `a`: it waits for it.
    q.enqueue(vec![member("u10", false)]).await.unwrap();
    assert!(q.lease(&limits()).unwrap().is_empty());
    q.complete(a.into_iter().map(|l| (l, Outcome::Delivered)).collect())
        .unwrap();
    let waited = q.lease(&limits()).unwrap();
    assert_eq!(members(&waited), vec![("u10".to_string(), false)]);

    // `b` comes back with its first five to be retried: they are leased again.
    let outcomes = b
        .into_iter()
        .enumerate()
        .map(|(i, l)| {
            (
                l,
                if i < 5 {
                    Outcome::Retry
                } else {
                    Outcome::Delivered
                },
            )
        })
        .collect();
    q.complete(outcomes).unwrap();
    let retried: Vec<String> = members(&q.lease(&limits()).unwrap())
        .into_iter()
        .map(|(u, _)| u)
        .collect();
    assert_eq!(retried, ["u75", "u76", "u77", "u78", "u79"]);
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

/// A completion of events alone may leave what left the log unwritten for a few ms (it is
/// written at most every 20 ms); closing the queue writes it, so a clean close never resends.
#[tokio::test]
async fn events_delivered_just_before_a_close_stay_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let q = Queue::open(dir.path(), settings(100)).unwrap();
    q.enqueue((0..10).map(event).collect()).await.unwrap();
    assert_eq!(drain(&q, || Outcome::Delivered).len(), 10);
    drop(q);
    let q = Queue::open(dir.path(), settings(100)).unwrap();
    assert_eq!(q.pending(), 0);
    assert!(q.lease(&limits()).unwrap().is_empty());
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
    let mut upload = Snapshots::open(dir.path(), q.clone())
        .unwrap()
        .begin("a", "1")
        .unwrap()
        .with_run_bytes(4096);
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
    let mut upload = Snapshots::open(dir.path(), q.clone())
        .unwrap()
        .begin("a", "1")
        .unwrap()
        .with_run_bytes(4096);
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
    // sled's I/O threads may hold a just-closed database's lock for a moment (see
    // `store::open_sled`).
    let path = queue_dir.join(generation.trim());
    let started = std::time::Instant::now();
    let db = loop {
        match sled::open(&path) {
            Ok(db) => break db,
            Err(_) if started.elapsed() < std::time::Duration::from_secs(1) => {
                std::thread::sleep(std::time::Duration::from_millis(20))
            }
            Err(e) => panic!("{e}"),
        }
    };
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

/// The event log's segment files, oldest first.
fn event_segments(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut segments: Vec<_> = std::fs::read_dir(dir.join("queue/events"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    segments.sort();
    segments
}

/// The payload length of a segment's first frame: its 24-byte header holds it at bytes 4..8.
fn first_payload_len(segment: &[u8]) -> usize {
    u32::from_le_bytes(segment[4..8].try_into().unwrap()) as usize
}

/// The envelope an event is stored as.
fn envelope(n: u32) -> Vec<u8> {
    aiq_braze_sync::queue::format::encode(&event(n), 1)
}

/// Events an older release kept in sled (lane `01`) move to the event log at open, in order;
/// one that no longer decodes (a bit flip, a downgrade) is moved to the dead letters with the
/// reason instead of wedging the queue, and the records around it flow.
#[tokio::test]
async fn events_an_older_release_left_in_sled_move_to_the_event_log() {
    use aiq_braze_sync::queue::format;
    let dir = tempfile::tempdir().unwrap();
    queued_on_disk(dir.path(), vec![]).await;
    edit_on_disk(dir.path(), |tree| {
        let garbage = [9u8, 1, 2, 3];
        let (one, three) = (envelope(1), envelope(3));
        let chunk = format::encode_event_chunk(
            1,
            vec![(1, &one[..]), (2, &garbage[..]), (3, &three[..])].into_iter(),
        );
        tree.insert(format::record_key(format::LANE_EVENTS, 1), chunk)
            .unwrap();
        tree.insert(format::record_key(format::LANE_EVENTS, 4), envelope(4))
            .unwrap();
        tree.insert(format::META_COUNTS, &format::encode_counts(4, 0, 0)[..])
            .unwrap();
    });
    {
        let q = Queue::open(dir.path(), settings(100)).unwrap();
        assert_eq!(q.stats().unwrap().pending, 4);
    }
    // Moved, not copied: a second open finds them once, in the log only.
    edit_on_disk(dir.path(), |tree| {
        assert_eq!(tree.scan_prefix([format::LANE_EVENTS]).count(), 0);
    });
    let q = Queue::open(dir.path(), settings(100)).unwrap();
    assert_eq!(q.stats().unwrap().pending, 4);
    let leased = q.lease(&limits()).unwrap();
    let seqs: Vec<u64> = leased.iter().map(|l| l.seq).collect();
    assert_eq!(seqs, vec![1, 3, 4]);
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
    // New events take seqs after the old ones.
    q.enqueue(vec![event(5)]).await.unwrap();
    assert_eq!(q.lease(&limits()).unwrap()[0].seq, 5);
}

/// A frame of the event log whose bytes changed on disk fails its checksum: the chunk is moved
/// aside whole, under its first seq, and counted out; the next request's events still flow,
/// and the damage is found once, not again at the next open.
#[tokio::test]
async fn an_event_log_frame_that_fails_its_checksum_is_moved_aside_whole() {
    let dir = tempfile::tempdir().unwrap();
    queued_on_disk(
        dir.path(),
        vec![vec![event(1), event(2), event(3)], vec![event(4), event(5)]],
    )
    .await;
    let segments = event_segments(dir.path());
    assert_eq!(segments.len(), 1, "{segments:?}");
    let mut bytes = std::fs::read(&segments[0]).unwrap();
    let len = first_payload_len(&bytes);
    bytes[24 + len - 1] ^= 0x40;
    std::fs::write(&segments[0], &bytes).unwrap();

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
            .contains("checksum mismatch"),
        "{:?}",
        dead[0]
    );
    q.sync().await.unwrap();
    drop(leased);
    drop(q);
    let q = Queue::open(dir.path(), settings(100)).unwrap();
    let s = q.stats().unwrap();
    assert_eq!((s.pending, s.dead), (2, 1));
}

/// A frame header of the event log damaged so that the frames cannot be walked: at open, the
/// bytes up to the next sound frame go to the dead letters, loudly, and are sealed so the next
/// open passes over them; what came before and after flows.
#[tokio::test]
async fn an_event_log_frame_header_damaged_is_set_aside_at_open() {
    let dir = tempfile::tempdir().unwrap();
    queued_on_disk(
        dir.path(),
        vec![vec![event(1)], vec![event(2)], vec![event(3)]],
    )
    .await;
    // A second segment: each open appends to a new one.
    queued_on_disk(dir.path(), vec![vec![event(4)]]).await;
    let segments = event_segments(dir.path());
    assert_eq!(segments.len(), 2, "{segments:?}");
    let mut bytes = std::fs::read(&segments[0]).unwrap();
    let len = first_payload_len(&bytes);
    // The second frame's magic.
    bytes[24 + len] ^= 0xff;
    std::fs::write(&segments[0], &bytes).unwrap();

    let q = Queue::open(dir.path(), settings(100)).unwrap();
    let s = q.stats().unwrap();
    assert_eq!((s.pending, s.dead), (3, 1));
    let seqs: Vec<u64> = drain(&q, || Outcome::Delivered);
    assert_eq!(seqs, vec![1, 3, 4]);
    let dead = q.dead(10).unwrap();
    assert!(
        dead[0]
            .reason
            .as_deref()
            .unwrap_or("")
            .contains("no frame header"),
        "{:?}",
        dead[0]
    );
    q.sync().await.unwrap();
    drop(q);
    let q = Queue::open(dir.path(), settings(100)).unwrap();
    let s = q.stats().unwrap();
    assert_eq!((s.pending, s.dead), (0, 1));
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
    queued_on_disk(dir.path(), vec![]).await;
    // What the older release's quarantine wrote.
    edit_on_disk(dir.path(), |tree| {
        let envelopes = [envelope(1), envelope(2), envelope(3)];
        let chunk = format::encode_event_chunk(
            1,
            envelopes
                .iter()
                .zip(1u64..)
                .map(|(e, seq)| (seq, &e[..]))
                .collect::<Vec<_>>()
                .into_iter(),
        );
        let dead = format::Dead {
            dead_at_ms: 1,
            attempts: 0,
            reason: "undecodable stored record: unknown format version 3".into(),
            stored: chunk,
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

/// Events accepted while nothing was ever delivered are known only to the event log. After a
/// crash that left the newest segment holding only a torn write, the next events still get
/// seqs after every stored one (a repeat would collide with a pending chunk).
#[tokio::test]
async fn seqs_continue_past_events_only_the_log_knows() {
    let dir = tempfile::tempdir().unwrap();
    queued_on_disk(dir.path(), vec![vec![event(1), event(2), event(3)]]).await;
    // A newer segment holding half a frame header: a crash in the middle of its first write.
    std::fs::write(
        dir.path().join("queue/events/0000000002.seg"),
        [0x41, 0x51, 0x45],
    )
    .unwrap();
    let q = Queue::open(dir.path(), settings(100)).unwrap();
    q.enqueue(vec![event(4)]).await.unwrap();
    let seqs = drain(&q, || Outcome::Delivered);
    assert_eq!(seqs, vec![1, 2, 3, 4]);
}

/// A `CURRENT` that names a generation which is not there is refused with a message naming
/// the file and what is there, and nothing is removed: the records come back once `CURRENT`
/// is set right.
#[tokio::test]
async fn a_current_naming_a_missing_generation_is_refused_and_deletes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let q = Queue::open(dir.path(), settings(1000)).unwrap();
    q.enqueue((0..50).map(|i| member(&format!("c{i}"), true)).collect())
        .await
        .unwrap();
    q.sync().await.unwrap();
    drop(q);
    let current = dir.path().join("queue").join("CURRENT");
    let real = std::fs::read_to_string(&current).unwrap();
    assert_eq!(real.trim(), "gen-000001");
    std::fs::write(&current, "gen-000009\n").unwrap();

    let err = match Queue::open(dir.path(), settings(1000)) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("a CURRENT naming a missing generation was opened"),
    };
    assert!(
        err.contains("CURRENT") && err.contains("gen-000009") && err.contains("gen-000001"),
        "{err}"
    );
    assert!(
        dir.path().join("queue/gen-000001/db").exists(),
        "the real queue was removed"
    );
    assert!(!dir.path().join("queue/gen-000009").exists());

    std::fs::write(&current, real).unwrap();
    let q = Queue::open(dir.path(), settings(1000)).unwrap();
    assert_eq!(q.pending(), 50);
}

/// Snapshot spill files stay within the disk's reserve and the queue's bound, and never
/// outlive their upload: an upload refused mid-way leaves no file, a snapshot over
/// `max_disk_bytes` is refused, and what a crash left is removed at the next open.
#[tokio::test]
async fn snapshot_spills_keep_the_reserve_and_the_bound_and_leave_nothing_behind() {
    use aiq_braze_sync::queue::QueueError;
    let dir = tempfile::tempdir().unwrap();
    let split_dir = dir.path().join("snapshots").join("a.1");
    let files = |d: &std::path::Path| -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(d)
            .map(|r| {
                r.flatten()
                    .map(|e| e.file_name().into_string().unwrap())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    };
    let add_many = |upload: &mut aiq_braze_sync::snapshot::SnapshotUpload, n: u32| {
        (0..n).try_for_each(|i| upload.add(&UserId::External(format!("user-{i}"))))
    };

    // The free-disk reserve is more than the disk has: the first spill is refused as full.
    let mut no_room = settings(1000);
    no_room.min_free_bytes = u64::MAX / 2;
    let q = Queue::open(dir.path(), no_room).unwrap();
    let mut upload = Snapshots::open(dir.path(), q.clone())
        .unwrap()
        .begin("a", "1")
        .unwrap()
        .with_run_bytes(4096);
    assert!(matches!(
        add_many(&mut upload, 2000),
        Err(SnapshotError::Queue(QueueError::Full(_)))
    ));
    drop(upload);
    assert_eq!(files(&split_dir), Vec::<String>::new());
    drop(q);

    // A snapshot bigger than the queue's disk bound is refused, and leaves nothing.
    let mut small = settings(1000);
    small.max_disk_bytes = 2 << 20;
    let q = Queue::open(dir.path(), small).unwrap();
    let mut upload = Snapshots::open(dir.path(), q.clone())
        .unwrap()
        .begin("a", "1")
        .unwrap()
        .with_run_bytes(64 << 10);
    let refused = add_many(&mut upload, 100_000);
    assert!(
        matches!(refused, Err(SnapshotError::Refused(ref why)) if why.contains("max_disk_bytes")),
        "{refused:?}"
    );
    drop(upload);
    assert_eq!(files(&split_dir), Vec::<String>::new());
    drop(q);

    // A crash mid-upload leaves runs; the next start (which opens the snapshots once it
    // holds the queue) removes them.
    std::fs::write(split_dir.join("run-0000.tmp"), b"left by a crash").unwrap();
    std::fs::write(split_dir.join("gen-000001.members"), b"unfinished").unwrap();
    let q = Queue::open(dir.path(), settings(1000)).unwrap();
    let _snapshots = Snapshots::open(dir.path(), q).unwrap();
    assert_eq!(files(&split_dir), Vec::<String>::new());
}

/// `state/` gives its space back: facts older than the skip window, with no dead letter of
/// their attribute left, are dropped by a rebuild at open, and the facts a dead letter needs
/// stay (its stale retry is still refused).
#[tokio::test]
async fn state_is_rebuilt_without_the_facts_no_longer_of_use() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(1_000_000);
    // No skip window: a fact is then of use only to a dead letter of its attribute.
    s.skip_unchanged_for = None;
    s.compact_min_bytes = 1 << 20;
    let deliver_all = |q: &Queue, outcome: Outcome| loop {
        let leased = q.lease(&limits()).unwrap();
        if leased.is_empty() {
            break;
        }
        q.complete(leased.into_iter().map(|l| (l, outcome.clone())).collect())
            .unwrap();
    };
    {
        let q = Queue::open(dir.path(), s.clone()).unwrap();
        // An update refused, then a newer one of the same attribute delivered.
        q.enqueue(vec![member("guarded", true)]).await.unwrap();
        deliver_all(&q, Outcome::Dead("REFUSED".into()));
        q.enqueue(vec![member("guarded", false)]).await.unwrap();
        for chunk in 0..20 {
            let users: Vec<Record> = (0..1000)
                .map(|i| member(&format!("user-{chunk}-{i}"), true))
                .collect();
            q.enqueue(users).await.unwrap();
        }
        deliver_all(&q, Outcome::Delivered);
        assert_eq!(q.stats().unwrap().dead, 1);
        q.sync().await.unwrap();
    }
    let state = dir.path().join("state");
    let before = aiq_braze_sync::queue::dir_bytes(&state);
    assert!(
        before > s.compact_min_bytes,
        "{before} bytes: too few to test"
    );

    let q = Queue::open(dir.path(), s.clone()).unwrap();
    let after = aiq_braze_sync::queue::dir_bytes(&state);
    eprintln!("state/: {before} bytes before the rebuild, {after} after");
    assert!(
        after * 4 < before,
        "state/ {before} bytes before, {after} after"
    );
    assert!(!dir.path().join("state.new").exists() && !dir.path().join("state.old").exists());
    // The dead `true` is older than the delivered `false`: its retry is refused still.
    let report = q
        .retry_dead(&aiq_braze_sync::queue::Selection::All)
        .await
        .unwrap();
    assert_eq!(report.superseded.len(), 1, "{report:?}");
    assert_eq!(q.pending(), 0);
}
