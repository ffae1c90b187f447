use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aiq_braze_sync::fake_braze::FakeBraze;
use serde_json::json;

use crate::common::*;

/// The real binary, started with a config file; killed with SIGKILL by `kill`.
struct Daemon {
    config: PathBuf,
    log: PathBuf,
    child: Option<Child>,
    starts: u32,
}

impl Daemon {
    fn spawn(&mut self) {
        self.starts += 1;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_aiq-braze-sync"))
            .args(["--config", self.config.to_str().unwrap(), "run"])
            .env_remove("BRAZE_API_KEY")
            .env_remove("BRAZE_REST_ENDPOINT")
            .env_remove("AIQ_SYNC_INGEST_TOKEN")
            .env_remove("NOTIFY_SOCKET")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn daemon");
        self.child = Some(child);
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().expect("SIGKILL"); // std's kill is SIGKILL on Unix
            c.wait().unwrap();
        }
    }

    fn sigterm(&mut self) -> i32 {
        let mut c = self.child.take().expect("running");
        Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status()
            .unwrap();
        c.wait().unwrap().code().unwrap_or(-1)
    }
}

fn write_config(dir: &Path, fake: &FakeBraze, port: u16) -> PathBuf {
    let path = dir.join("config.toml");
    std::fs::write(
        &path,
        format!(
            "data_dir = {:?}\n[braze]\nendpoint = {:?}\napi_key = {API_KEY:?}\nrequest_timeout_ms = 5000\n\
             [ingest]\nlisten = \"127.0.0.1:{port}\"\ntoken = {TOKEN:?}\n\
             [delivery]\nworkers = 4\nbackoff_initial_ms = 20\nbackoff_max_ms = 300\n[queue]\ncache_mb = 16\n\
             [update_existing_only]\nmemberships = false\n",
            dir.join("data"),
            fake.url()
        ),
    )
    .unwrap();
    path
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The real binary under concurrent ingest is killed with SIGKILL at random moments and
/// restarted; every record that got a 2xx is at the fake Braze afterwards. Duplicates are
/// allowed (at least once) and counted; losses must be zero.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_acknowledged_record_is_lost_across_sigkills() {
    let dir = tempfile::tempdir().unwrap();
    let (fake, mut daemon, _port, base, client) = start_binary(dir.path()).await;

    // Four writers post events (unique ids), memberships (unique users) and Braze-shaped
    // `/users/track` bodies (an attribute and an event each) until told to stop, recording
    // what was acknowledged.
    let acked_events: Arc<Mutex<HashSet<u64>>> = Default::default();
    let acked_members: Arc<Mutex<HashSet<u64>>> = Default::default();
    let acked_relayed: Arc<Mutex<HashSet<u64>>> = Default::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..4u64 {
        let (client, base, stop) = (client.clone(), base.clone(), stop.clone());
        let (acked_events, acked_members) = (acked_events.clone(), acked_members.clone());
        let acked_relayed = acked_relayed.clone();
        writers.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let first = (w << 32) | n;
                let ids: Vec<u64> = (first..first + 50).collect();
                let (path, body) = if n % 200 == 100 {
                    let items: Vec<_> = ids
                        .iter()
                        .map(|i| membership(&format!("m{i}"), "crash", "1", true))
                        .collect();
                    ("/v1/memberships", array(&items))
                } else if n % 200 == 150 {
                    let attributes: Vec<_> = ids
                        .iter()
                        .map(|i| json!({"external_id": format!("r{i}"), "relayed": i}))
                        .collect();
                    let events: Vec<_> = ids
                        .iter()
                        .map(|i| {
                            json!({"external_id": format!("r{i}"), "name": "relayed",
                                        "time": "2026-11-28T10:00:00Z", "properties": {"rid": i}})
                        })
                        .collect();
                    let body = json!({"attributes": attributes, "events": events});
                    ("/users/track", body.to_string())
                } else {
                    let items: Vec<_> = ids.iter().map(|&i| event(i)).collect();
                    ("/v1/events", array(&items))
                };
                let sent = client
                    .post(format!("{base}{path}"))
                    .bearer_auth(TOKEN)
                    .body(body)
                    .send()
                    .await;
                match sent {
                    Ok(r) if r.status().is_success() => {
                        let set = match path {
                            "/v1/events" => &acked_events,
                            "/users/track" => &acked_relayed,
                            _ => &acked_members,
                        };
                        set.lock().unwrap().extend(ids);
                        n += 50;
                    }
                    // Refused, reset, daemon down or stopping: not acknowledged, try again.
                    _ => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        }));
    }

    let mut rng = fastrand::Rng::with_seed(0x5eed ^ std::process::id() as u64);
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(rng.u64(400..1500))).await;
        daemon.kill9();
        tokio::time::sleep(Duration::from_millis(rng.u64(50..300))).await;
        daemon.spawn();
        wait_healthy(&client, &base).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    let events: HashSet<u64> = acked_events.lock().unwrap().clone();
    let members: HashSet<u64> = acked_members.lock().unwrap().clone();
    let relayed: HashSet<u64> = acked_relayed.lock().unwrap().clone();
    assert!(
        events.len() > 1000,
        "too little was acknowledged to mean anything: {}",
        events.len()
    );

    let arrived = |fake: &FakeBraze| {
        let got = event_counts(fake);
        let missing_events = events.iter().filter(|i| !got.contains_key(i)).count();
        let held = fake.attribute_state();
        let missing_members = members
            .iter()
            .filter(|i| {
                held.get(&(format!("external_id:m{i}"), "AIQ_crash_1".to_string()))
                    != Some(&json!(true))
            })
            .count();
        let relayed_events: HashSet<u64> = fake
            .events()
            .iter()
            .filter_map(|e| e["properties"]["rid"].as_u64())
            .collect();
        let missing_relayed = relayed
            .iter()
            .filter(|&&i| {
                !relayed_events.contains(&i)
                    || held.get(&(format!("external_id:r{i}"), "relayed".to_string()))
                        != Some(&json!(i))
            })
            .count();
        (missing_events, missing_members + missing_relayed, got)
    };
    let fake2 = fake.clone();
    let complete = wait_until(Duration::from_secs(90), || {
        let (e, m, _) = arrived(&fake2);
        e == 0 && m == 0
    })
    .await;
    let (missing_events, missing_members, got) = arrived(&fake);
    let duplicates: usize = got.values().map(|n| n - 1).sum();
    eprintln!(
        "crash test: {} starts, {} events, {} memberships and {} relayed attribute+event pairs acknowledged, {duplicates} duplicate events, {missing_events}/{missing_members} missing",
        daemon.starts, events.len(), members.len(), relayed.len()
    );
    assert!(
        complete,
        "lost acknowledged records: {missing_events} events, {missing_members} memberships or relayed; log: {}",
        std::fs::read_to_string(&daemon.log).unwrap_or_default()
    );
    // A clean stop after all that exits 0, as systemd expects.
    assert_eq!(
        daemon.sigterm(),
        0,
        "{}",
        std::fs::read_to_string(&daemon.log).unwrap_or_default()
    );
}

/// A fake Braze and the real binary talking to it on a free port, healthy.
async fn start_binary(dir: &Path) -> (FakeBraze, Daemon, u16, String, reqwest::Client) {
    let fake = FakeBraze::start(API_KEY).await.unwrap();
    let port = free_port();
    let mut daemon = Daemon {
        config: write_config(dir, &fake, port),
        log: dir.join("daemon.log"),
        child: None,
        starts: 0,
    };
    daemon.spawn();
    let base = format!("http://127.0.0.1:{port}");
    let client = http();
    wait_healthy(&client, &base).await;
    (fake, daemon, port, base, client)
}

async fn wait_healthy(client: &reqwest::Client, base: &str) {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        if let Ok(r) = client.get(format!("{base}/healthz")).send().await {
            if r.status() == 200 {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("daemon not healthy within 30 s");
}

/// A SIGKILL in the middle of a snapshot upload changes nothing: after the restart the next
/// snapshot is diffed against the last complete one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkill_during_a_snapshot_upload_leaves_the_last_complete_snapshot_as_reference() {
    use crate::snapshot::{counts, half_upload, ndjson, put};
    let dir = tempfile::tempdir().unwrap();
    let (_fake, mut daemon, port, base, client) = start_binary(dir.path()).await;
    let path = "/v1/audiences/77/splits/1/members";
    let users: Vec<String> = (0..1000).map(|i| format!("s{i}")).collect();
    let (status, v) = put(&base, path, ndjson(users.clone()), "application/x-ndjson").await;
    assert_eq!((status, counts(&v)), (200, (1000, 0, 0)), "{v}");

    let half = half_upload(&format!("127.0.0.1:{port}"), path, 20_000).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    daemon.kill9();
    drop(half);
    daemon.spawn();
    wait_healthy(&client, &base).await;

    let mut next = users.clone();
    next.push("late".into());
    let (status, v) = put(&base, path, ndjson(next), "application/x-ndjson").await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(counts(&v), (1, 0, 1000), "{v}");
    assert_eq!(daemon.sigterm(), 0);
}
