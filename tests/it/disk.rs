use std::time::{Duration, Instant};

use fake_braze::Behaviour;

use crate::common::*;

/// A backlog fills the queue while Braze is down; once it drains, the daemon rebuilds the
/// queue database and deletes the drained event log segments by itself, and the directory
/// shrinks to near its live size. Every record is
/// delivered exactly once, including those posted while the rebuild happened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_space_comes_back_after_a_backlog_drains() {
    let mut env = Env::start_with(|c| {
        c.queue.compact_min_bytes = 1 << 20;
    })
    .await;
    env.fake.set_behaviour(Behaviour::FailStatus {
        status: 503,
        until: Instant::now() + Duration::from_secs(3600),
    });
    // Events go to the event log, memberships to sled: both must give their disk back.
    let backlog = 40_000u64;
    for start in (0..backlog).step_by(1000) {
        let batch: Vec<_> = (start..start + 1000).map(event).collect();
        let (status, body) = env.post("/v1/events", array(&batch)).await;
        assert_eq!(status, 202, "{body}");
        let members: Vec<_> = (start..start + 1000)
            .map(|n| membership(&format!("user-{n}"), "1", "2", true))
            .collect();
        let (status, body) = env.post("/v1/memberships", array(&members)).await;
        assert_eq!(status, 202, "{body}");
    }
    // The queue's own directory: `state/` keeps what each user was last sent, for good.
    let full = dir_bytes(&env.data_dir().join("queue"));
    let stats = env.stats().await;
    assert_eq!(stats["queue"]["pending"], 2 * backlog);
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
    let counts = event_counts(&fake);
    assert!(
        counts.values().all(|&n| n == 1),
        "a record was delivered twice"
    );
    // Drained segments go at the next upkeep tick (once a second), after sled is synced.
    let queue_dir = env.data_dir().join("queue");
    let shrunk = wait_until(Duration::from_secs(30), || dir_bytes(&queue_dir) * 4 < full).await;
    let after = dir_bytes(&queue_dir);
    eprintln!("queue directory: {full} bytes with {backlog} events and {backlog} memberships pending, {after} after the drain; {refused} ingest requests got 503 during the rebuild");
    assert!(shrunk, "directory did not shrink: {full} -> {after}");
    assert!(env.stats().await["queue"]["generation"].as_u64() >= Some(2));
    env.shutdown().await;

    // The rebuilt queue opens again, empty, in its new generation.
    let fake2 = fake_braze::FakeBraze::start(API_KEY).await.unwrap();
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

/// A tmpfs of `size` mounted on `dir`, unmounted on drop. Needs root (CI and this project's
/// machines run tests as root); set AIQ_SKIP_MOUNT_TESTS=1 to skip where mounting is not
/// allowed, so that skipping is a decision, not an accident.
struct SmallFs(std::path::PathBuf);

impl SmallFs {
    fn mount(dir: &std::path::Path, size: &str) -> Option<SmallFs> {
        if std::env::var_os("AIQ_SKIP_MOUNT_TESTS").is_some() {
            eprintln!("AIQ_SKIP_MOUNT_TESTS set: the full-disk test is skipped");
            return None;
        }
        std::fs::create_dir_all(dir).unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .expect("mount runs");
        assert!(
            out.status.success(),
            "cannot mount a small tmpfs for the full-disk test (run as root, or set \
             AIQ_SKIP_MOUNT_TESTS=1): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Some(SmallFs(dir.to_path_buf()))
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// The disk fills up while Braze is down: past the free-space reserve ingest answers 503
/// with Retry-After instead of acknowledging what it may not be able to store, nothing
/// acknowledged is lost, delivery goes on once Braze is back, and ingest accepts again once
/// space frees. (Without the reserve sled meets ENOSPC mid-write, treats it as fatal, and
/// both ingest and delivery stop until a restart: this test found that.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_ingest_and_recovers_once_space_frees() {
    let root = tempfile::tempdir().unwrap();
    let mount = root.path().join("fs");
    let Some(_fs) = SmallFs::mount(&mount, "20m") else {
        return;
    };
    // Ballast that an operator can delete to free space.
    let ballast = mount.join("ballast");
    std::fs::write(&ballast, vec![0u8; 4 << 20]).unwrap();
    let data = mount.join("data");
    let env = Env::start_with(|c| {
        c.data_dir = data.clone();
        c.queue.cache_bytes = 4 << 20;
        c.queue.min_free_bytes = 4 << 20;
    })
    .await;
    env.fake.set_behaviour(Behaviour::FailStatus {
        status: 503,
        until: Instant::now() + Duration::from_secs(3600),
    });
    let mut acked = Vec::new();
    let mut next = 0u64;
    let mut refusal = None;
    for _ in 0..2000 {
        let batch: Vec<_> = (next..next + 500).map(event).collect();
        let (status, body) = env.post("/v1/events", array(&batch)).await;
        match status {
            202 => acked.extend(next..next + 500),
            503 => {
                refusal = Some(body);
                break;
            }
            other => panic!("{other}: {body}"),
        }
        next += 500;
    }
    let refusal = refusal.expect("the disk never filled");
    assert!(
        refusal["error"]
            .as_str()
            .unwrap_or("")
            .contains("below the 4 MiB reserve"),
        "{refusal}"
    );
    assert!(acked.len() > 5_000, "only {} acknowledged", acked.len());

    // Space frees and Braze comes back: everything acknowledged arrives, and ingest accepts
    // again (the refused request can be sent again).
    std::fs::remove_file(&ballast).unwrap();
    env.fake.set_behaviour(Behaviour::Accept);
    let fake = env.fake.clone();
    let total = acked.len();
    let delivered = wait_until(Duration::from_secs(120), || {
        event_counts(&fake).len() >= total
    })
    .await;
    let got = event_counts(&fake);
    let missing = acked.iter().filter(|i| !got.contains_key(i)).count();
    assert!(
        delivered && missing == 0,
        "{missing} acknowledged events missing"
    );
    let mut accepted_again = false;
    for _ in 0..100 {
        let batch: Vec<_> = (next..next + 500).map(event).collect();
        if env.post("/v1/events", array(&batch)).await.0 == 202 {
            accepted_again = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(accepted_again, "ingest never recovered after space freed");
    let fake = env.fake.clone();
    assert!(
        wait_until(Duration::from_secs(30), || event_counts(&fake)
            .contains_key(&(next + 499)))
        .await
    );
}

/// The daemon's state (what each attribute was last sent as) and the snapshots live on the
/// same disk and count in `queue stats` and in `queue.max_disk_bytes`, like the queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_state_and_the_snapshots_count_in_the_disk_bytes() {
    let env = Env::start().await;
    let records: Vec<_> = (0..200)
        .map(|u| serde_json::json!({"external_id": format!("s{u}"), "attributes": {"tier": "gold", "n": u}}))
        .collect();
    assert_eq!(env.post("/v1/attributes", array(&records)).await.0, 202);
    let data = env.data_dir();
    let (counted, stats) = wait_for_stats(&env, Duration::from_secs(10), |s| {
        let shown = s["queue"]["disk_bytes"].as_u64().unwrap_or(0);
        let state = dir_bytes(&data.join("state"));
        s["queue"]["pending"] == 0
            && state > 0
            && shown >= state + dir_bytes(&data.join("queue").join("gen-000001"))
    })
    .await;
    assert!(
        counted,
        "{stats}; state {} bytes, queue {} bytes",
        dir_bytes(&data.join("state")),
        dir_bytes(&data.join("queue"))
    );
}
