//! Power loss: the real binary keeps its data directory on `powercut`, a FUSE filesystem that
//! forgets, at a cut, every write not yet fsynced and (in its strict mode) every directory
//! entry not yet synced through its parent. Writers post while Braze is down and while it is
//! up; the daemon is killed with SIGKILL at a random moment or inside an fsync, the power is
//! cut, and the daemon starts again on what survived. At the end every record that got a 2xx
//! must be at the fake Braze.
//!
//! `POWERLOSS_CYCLES` sets the cuts per mode (3 by default; the README has the long run).
//! Mounting needs root and `/dev/fuse`: without them the tests say so and pass, unless
//! `POWERCUT_REQUIRED` is set (CI sets it), when they fail.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use fake_braze::{Behaviour, FakeBraze};
use powercut::{Mode, PowerCut};
use serde_json::json;

use crate::binary::*;
use crate::common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_cuts_lose_no_acknowledged_record_when_only_unsynced_data_is_lost() {
    power_cuts(Mode::Ordered).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn power_cuts_lose_no_acknowledged_record_when_unsynced_directory_entries_are_lost_too() {
    power_cuts(Mode::Strict).await;
}

/// What the writers were told was accepted (a 2xx).
#[derive(Default)]
struct Acked {
    events: HashSet<u64>,
    members: HashSet<u64>,
}

/// Mounts the layer, or says why this machine cannot (and fails if `POWERCUT_REQUIRED`).
fn mount(dir: &Path, mode: Mode) -> Option<PowerCut> {
    let (backing, mountpoint) = (dir.join("backing"), dir.join("mnt"));
    std::fs::create_dir_all(&backing).unwrap();
    std::fs::create_dir_all(&mountpoint).unwrap();
    match PowerCut::mount(&backing, &mountpoint, mode) {
        Ok(pc) => Some(pc),
        Err(e)
            if powercut::is_unavailable(&e) && std::env::var_os("POWERCUT_REQUIRED").is_none() =>
        {
            eprintln!("power-loss test skipped: cannot mount the FUSE layer here ({e})");
            None
        }
        Err(e) => panic!("POWERCUT_REQUIRED is set but the FUSE layer cannot mount: {e}"),
    }
}

/// The real binary with its data directory on the layer mounted under `dir`, talking to
/// `fake`, healthy. The data directory does not exist yet: the daemon creates it on the
/// layer, so its first start is under test too.
async fn start_on_layer(dir: &Path, fake: &FakeBraze) -> (Daemon, String, reqwest::Client) {
    let port = free_port();
    let data_dir = dir.join("mnt").join("data");
    let mut daemon = Daemon {
        config: write_config_at(dir, &data_dir, fake, port),
        log: dir.join("daemon.log"),
        child: None,
        starts: 0,
    };
    let base = format!("http://127.0.0.1:{port}");
    let client = http();
    daemon.spawn();
    daemon.until_healthy(&client, &base).await;
    (daemon, base, client)
}

/// One writer: a request every 20 ms, of 50 events or, every eighth, 50 memberships, each
/// record unique, even across attempts; what got a 2xx goes into `acked`. Runs until `stop`.
async fn writer(w: u64, base: String, acked: Arc<Mutex<Acked>>, stop: Arc<AtomicBool>) {
    let client = http();
    let mut n = 0u64;
    // A steady 2,500 records a second, however fast the build: the fake Braze keeps every
    // event in memory, and a release build's long run would otherwise fill it.
    let mut pace = tokio::time::interval(Duration::from_millis(20));
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while !stop.load(Ordering::Relaxed) {
        pace.tick().await;
        let first = (w << 32) | n;
        let ids: Vec<u64> = (first..first + 50).collect();
        let memberships = (n / 50) % 8 == 7;
        let (path, body) = if memberships {
            let items: Vec<_> = ids
                .iter()
                .map(|i| membership(&format!("m{i}"), "pl", "1", true))
                .collect();
            ("/v1/memberships", array(&items))
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
        // Fresh ids either way: a request that got no answer may still have been queued, and
        // sending its records again would count as Braze's duplicates what are the client's.
        n += 50;
        match sent {
            Ok(r) if r.status().is_success() => {
                let mut a = acked.lock().unwrap();
                match memberships {
                    true => a.members.extend(ids),
                    false => a.events.extend(ids),
                }
            }
            // Refused, reset, or the daemon down: not acknowledged, so nothing is owed.
            _ => {}
        }
    }
}

async fn power_cuts(mode: Mode) {
    let cycles: u32 = std::env::var("POWERLOSS_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    let dir = tempfile::tempdir().unwrap();
    let Some(mut pc) = mount(dir.path(), mode) else {
        return;
    };
    let fake = FakeBraze::start(API_KEY).await.unwrap();
    let (mut daemon, base, client) = start_on_layer(dir.path(), &fake).await;

    let acked: Arc<Mutex<Acked>> = Default::default();
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..2)
        .map(|w| tokio::spawn(writer(w, base.clone(), acked.clone(), stop.clone())))
        .collect();

    let mut rng = fastrand::Rng::with_seed(0xc0ffee ^ u64::from(std::process::id()));
    let mut cuts = Vec::new();
    // For each cut with Braze up, how many events Braze had taken by then.
    let mut up_cuts = Vec::new();
    for cycle in 0..cycles {
        // Braze down in even cycles (the queue fills), up in odd ones (it drains while
        // records arrive, so delivery progress is being written when the power goes). Every
        // other pair of cycles kills inside a sync, so four cycles see all four situations.
        let braze_up = cycle % 2 == 1;
        let in_sync = (cycle / 2) % 2 == 1;
        fake.set_behaviour(match braze_up {
            true => Behaviour::Accept,
            false => Behaviour::FailStatus {
                status: 503,
                until: Instant::now() + Duration::from_secs(3600),
            },
        });
        tokio::time::sleep(Duration::from_millis(rng.u64(300..1500))).await;
        let delivered_before = fake.events().len();
        let how = kill(&mut daemon, &pc, in_sync, rng.u64(0..20), rng.bool());
        let report = tokio::task::block_in_place(|| pc.cut()).expect("power cut");
        cuts.push(format!(
            "cycle {cycle} (Braze {}): {how}; {report:?}",
            if braze_up { "up" } else { "down" }
        ));
        daemon.spawn();
        daemon.until_healthy(&client, &base).await;
        if braze_up {
            up_cuts.push(delivered_before);
        }
    }
    fake.set_behaviour(Behaviour::Accept);
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }

    let a = std::mem::take(&mut *acked.lock().unwrap());
    assert!(
        a.events.len() > 1000,
        "too little was acknowledged to mean anything: {} events",
        a.events.len()
    );
    let config = daemon.config.clone();
    let drained = wait_until(Duration::from_secs(300), || {
        let s = cli_json(&config, &["queue", "stats", "--json"]);
        s["queue"]["pending"] == 0 && s["queue"]["in_flight"] == 0
    })
    .await;
    let missing = |fake: &FakeBraze| -> Vec<String> {
        let got = event_counts(fake);
        let held = fake.attribute_state();
        let events = a.events.iter().filter(|i| !got.contains_key(i));
        let members = a.members.iter().filter(|i| {
            held.get(&(format!("external_id:m{i}"), "AIQ_pl_1".to_string())) != Some(&json!(true))
        });
        events
            .map(|i| format!("event {i}"))
            .chain(members.map(|i| format!("membership m{i}")))
            .collect()
    };
    let fake2 = fake.clone();
    let complete =
        drained && wait_until(Duration::from_secs(30), || missing(&fake2).is_empty()).await;
    let lost = missing(&fake);
    let got: HashMap<u64, usize> = event_counts(&fake);
    let duplicates: usize = got.values().map(|n| n - 1).sum();
    eprintln!(
        "power loss ({mode:?}): {} starts, acknowledged {} events and {} memberships, \
         {duplicates} duplicate events after {} cuts with Braze up (it had taken {:?} events \
         at each), {} lost; {:?}\n  {}",
        daemon.starts,
        a.events.len(),
        a.members.len(),
        up_cuts.len(),
        up_cuts,
        lost.len(),
        pc.counters(),
        cuts.join("\n  ")
    );
    assert!(
        drained,
        "the queue did not drain in 300 s: {}",
        cli_json(&config, &["queue", "stats", "--json"])
    );
    assert!(
        complete,
        "lost {} acknowledged records, e.g. {:?}; cuts:\n  {}\nlog: {}",
        lost.len(),
        &lost[..lost.len().min(10)],
        cuts.join("\n  "),
        std::fs::read_to_string(&daemon.log).unwrap_or_default()
    );
    assert_eq!(
        daemon.sigterm(),
        0,
        "{}",
        std::fs::read_to_string(&daemon.log).unwrap_or_default()
    );
    tokio::task::block_in_place(|| pc.unmount()).expect("unmount");
}

/// Kills the daemon with SIGKILL: at once, or inside the fsync that comes after `skip` more,
/// which then either completes or not (a power cut may land on either side of the disk's
/// flush). Says which.
fn kill(
    daemon: &mut Daemon,
    pc: &PowerCut,
    in_sync: bool,
    skip: u64,
    sync_completes: bool,
) -> String {
    if !in_sync {
        daemon.kill9();
        return "SIGKILL".into();
    }
    tokio::task::block_in_place(|| {
        let trap = pc.arm_sync_trap_after(skip);
        let Some(trapped) = trap.wait(Duration::from_secs(5)) else {
            daemon.kill9();
            return "SIGKILL (no sync within 5 s)".into();
        };
        let what = format!("SIGKILL inside {trapped:?}, which completes: {sync_completes}");
        let mut child = daemon.child.take().expect("the daemon runs");
        child.kill().expect("SIGKILL");
        // The killed process waits for its fsync's answer before it can die.
        trapped.release(sync_completes);
        child.wait().unwrap();
        what
    })
}

/// A disk that fills behind the daemon's back (its free-space check saw room): ingest is
/// refused and nothing acknowledged is lost, `/readyz` says why, and once there is room again
/// the daemon takes records again, in place or after the restart it exits for (as systemd's
/// `Restart=on-failure` would start it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_is_reported_and_recovered_from_without_losing_anything() {
    let dir = tempfile::tempdir().unwrap();
    let Some(pc) = mount(dir.path(), Mode::Ordered) else {
        return;
    };
    let fake = FakeBraze::start(API_KEY).await.unwrap();
    fake.set_behaviour(Behaviour::FailStatus {
        status: 503,
        until: Instant::now() + Duration::from_secs(3600),
    });
    let (mut daemon, base, client) = start_on_layer(dir.path(), &fake).await;
    let send = |ids: std::ops::Range<u64>| {
        let (client, base) = (client.clone(), base.clone());
        async move {
            let items: Vec<_> = ids.map(event).collect();
            post(&client, &format!("{base}/v1/events"), array(&items)).await
        }
    };
    assert_eq!(send(0..50).await.0, 202);

    let members = |users: std::ops::Range<u64>| {
        let (client, base) = (client.clone(), base.clone());
        async move {
            let items: Vec<_> = users
                .map(|u| membership(&format!("full-{u}"), "9", "1", true))
                .collect();
            post(&client, &format!("{base}/v1/memberships"), array(&items)).await
        }
    };
    assert_eq!(members(0..20).await.0, 202);

    pc.set_full(true);
    let (status, v) = send(50..100).await;
    assert_eq!(status, 503, "{v}");
    let (status, v) = members(20..40).await;
    assert_eq!(status, 503, "{v}");
    let ready = client.get(format!("{base}/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    let reason = ready.text().await.unwrap();
    assert!(reason.contains("storage failing"), "{reason}");

    pc.set_full(false);
    // sled does not recover from a failed write in place: within its give-up time the daemon
    // exits non-zero, and is started again here as systemd would.
    let deadline = Instant::now() + Duration::from_secs(60);
    let exit = loop {
        let exited = daemon
            .child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten());
        if let Some(status) = exited {
            daemon.child = None;
            break Some(status);
        }
        if Instant::now() > deadline {
            break None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let exit = exit.expect("the daemon kept running on a store that cannot write");
    assert!(!exit.success(), "exit {exit:?}");
    let log = std::fs::read_to_string(&daemon.log).unwrap_or_default();
    assert!(log.contains("exiting for a restart"), "{log}");
    daemon.spawn();
    daemon.until_healthy(&client, &base).await;
    assert_eq!(
        send(200..250).await.0,
        202,
        "{}",
        std::fs::read_to_string(&daemon.log).unwrap_or_default()
    );
    let (status, v) = members(40..60).await;
    assert_eq!(
        status,
        202,
        "{v}; log: {}",
        std::fs::read_to_string(&daemon.log).unwrap_or_default()
    );
    fake.set_behaviour(Behaviour::Accept);
    let got = |f: &FakeBraze| event_counts(f);
    let fake2 = fake.clone();
    assert!(
        wait_until(Duration::from_secs(30), || {
            let got = got(&fake2);
            (0..50).chain(200..250).all(|i| got.contains_key(&i))
        })
        .await,
        "acknowledged events lost; log: {}",
        std::fs::read_to_string(&daemon.log).unwrap_or_default()
    );
    assert_eq!(daemon.sigterm(), 0);
}
