//! The real binary under a stand-in for systemd: a notify socket that records what the
//! daemon says (READY, STATUS, WATCHDOG, RELOADING, STOPPING), and signals as systemd sends
//! them (SIGHUP for reload, SIGTERM for stop).

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::*;
use fake_braze::{Behaviour, FakeBraze};

/// Messages received on the notify socket, with when they arrived.
type Heard = Arc<Mutex<Vec<(Instant, String)>>>;

/// Binds a notify socket in `dir` and records every datagram on a thread.
fn notify_socket(dir: &Path) -> (PathBuf, Heard) {
    let path = dir.join("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    let heard: Heard = Default::default();
    let sink = Arc::clone(&heard);
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 4096];
        while let Ok(n) = socket.recv(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            sink.lock().unwrap().push((Instant::now(), text));
        }
    });
    (path, heard)
}

fn config_text(dir: &Path, fake: &FakeBraze, port: u16, extra: &str) -> String {
    format!(
        "data_dir = {:?}\n[braze]\nendpoint = {:?}\napi_key = {API_KEY:?}\nrequest_timeout_ms = 30000\n\
         [ingest]\nlisten = \"127.0.0.1:{port}\"\ntoken = {TOKEN:?}\n\
         [delivery]\nbackoff_initial_ms = 20\nbackoff_max_ms = 300\n{extra}",
        dir.join("data"),
        fake.url()
    )
}

fn spawn(config: &Path, log: &Path, env: &[(&str, String)]) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_aiq-braze-sync"));
    cmd.args(["--config", config.to_str().unwrap(), "run"])
        .env_remove("BRAZE_API_KEY")
        .env_remove("BRAZE_REST_ENDPOINT")
        .env_remove("AIQ_SYNC_INGEST_TOKEN")
        .env_remove("NOTIFY_SOCKET")
        .env_remove("WATCHDOG_USEC")
        .env_remove("WATCHDOG_PID")
        .env_remove("JOURNAL_STREAM")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log).unwrap());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.spawn().expect("spawn daemon")
}

fn sigterm(child: &mut Child) -> i32 {
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    child.wait().unwrap().code().unwrap_or(-1)
}

fn sighup(child: &Child) {
    Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .unwrap();
}

async fn wait_for(heard: &Heard, limit: Duration, what: impl Fn(&str) -> bool) -> bool {
    let heard = Arc::clone(heard);
    wait_until(limit, move || {
        heard.lock().unwrap().iter().any(|(_, m)| what(m))
    })
    .await
}

/// Times at which WATCHDOG=1 arrived.
fn pings(heard: &Heard) -> Vec<Instant> {
    heard
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, m)| m.lines().any(|l| l == "WATCHDOG=1"))
        .map(|(t, _)| *t)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_speaks_the_notify_protocol_and_its_watchdog_follows_delivery() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeBraze::start(API_KEY).await.unwrap();
    let port = free_port();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, config_text(dir.path(), &fake, port, "")).unwrap();
    let (socket, heard) = notify_socket(dir.path());
    let log = dir.path().join("daemon.log");
    let mut child = spawn(
        &config,
        &log,
        &[
            ("NOTIFY_SOCKET", socket.to_str().unwrap().to_string()),
            // systemd's WatchdogSec=2: pings every 0.5 s, a step stuck past 1.5 s stops them.
            ("WATCHDOG_USEC", "2000000".into()),
        ],
    );
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();

    // READY=1 comes first, and only once the listener takes connections.
    assert!(
        wait_for(&heard, Duration::from_secs(20), |m| m.contains("READY=1")).await,
        "no READY=1; log: {}",
        read_log()
    );
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
        "READY=1 before the listener was bound"
    );
    assert!(heard.lock().unwrap()[0].1.contains("READY=1"));
    assert!(read_log().contains("not below three quarters of WatchdogSec"));

    // STATUS= says how much is pending and what delivery is doing; pings come steadily.
    let client = http();
    let base = format!("http://127.0.0.1:{port}");
    let (status, _) = post(&client, &format!("{base}/v1/events"), array(&[event(1)])).await;
    assert_eq!(status, 202);
    assert!(
        wait_for(&heard, Duration::from_secs(10), |m| m
            .contains("STATUS=delivering;")
            && m.contains("pending"))
        .await
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(pings(&heard).len() >= 2, "{:?}", heard.lock().unwrap());

    // A worker stuck in one request for longer than the watchdog allows: pings stop, then
    // resume once it comes back.
    fake.set_behaviour(Behaviour::Hang {
        delay: Duration::from_secs(4),
        until: Instant::now() + Duration::from_millis(500),
    });
    // Taken before the post: the event may be leased and its request hang before the 202
    // gets back to us (a loaded disk makes the commit slow), and the gap must be seen whole.
    let hung_at = Instant::now();
    let (status, _) = post(&client, &format!("{base}/v1/events"), array(&[event(2)])).await;
    assert_eq!(status, 202);
    assert!(
        wait_until(Duration::from_secs(15), || read_log()
            .contains("watchdog pings resumed"))
        .await,
        "log: {}",
        read_log()
    );
    let log_text = read_log();
    assert!(log_text.contains("watchdog pings stopped"), "{log_text}");
    let after: Vec<Instant> = pings(&heard).into_iter().filter(|t| *t > hung_at).collect();
    let longest_gap = after
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default();
    assert!(
        longest_gap >= Duration::from_secs(2),
        "pings went on while a worker was stuck: longest gap {longest_gap:?}"
    );
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let resumed = pings(&heard).into_iter().filter(|t| *t > hung_at).count();
    assert!(resumed > after.len(), "pings did not resume");

    // SIGTERM: STOPPING=1, a clean exit.
    assert_eq!(sigterm(&mut child), 0, "{}", read_log());
    assert!(wait_for(&heard, Duration::from_secs(5), |m| m.contains("STOPPING=1")).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_what_can_change_live_and_says_what_it_reloaded() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeBraze::start(API_KEY).await.unwrap();
    let port = free_port();
    let config = dir.path().join("config.toml");
    std::fs::write(&config, config_text(dir.path(), &fake, port, "")).unwrap();
    let (socket, heard) = notify_socket(dir.path());
    let log = dir.path().join("daemon.log");
    let mut child = spawn(
        &config,
        &log,
        &[("NOTIFY_SOCKET", socket.to_str().unwrap().to_string())],
    );
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    assert!(wait_for(&heard, Duration::from_secs(20), |m| m.contains("READY=1")).await);
    let client = http();
    let url = format!("http://127.0.0.1:{port}/v1/events");
    let send = |token: &'static str, id: u64| {
        let (client, url) = (client.clone(), url.clone());
        async move {
            client
                .post(url)
                .bearer_auth(token)
                .body(array(&[event(id)]))
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(send(TOKEN, 1).await, 202);

    // A new token, a rate ceiling, a new level, and a listen address that needs a restart.
    let new_token = "rotated-token-9876";
    let text = config_text(
        dir.path(),
        &fake,
        port,
        "max_requests_per_second = 5\n[queue]\nmax_records = 5000000\n[log]\nlevel = \"debug\"\n",
    )
    .replace(TOKEN, new_token)
    .replace("backoff_max_ms = 300", "backoff_max_ms = 400")
    .replace(
        &format!("127.0.0.1:{port}"),
        &format!("127.0.0.1:{}", port + 1),
    );
    std::fs::write(&config, text).unwrap();
    let before = heard.lock().unwrap().len();
    sighup(&child);
    assert!(
        wait_until(Duration::from_secs(10), || read_log().contains("reloaded")).await,
        "{}",
        read_log()
    );
    let log_text = read_log();
    let reloaded = log_text.lines().find(|l| l.contains("reloaded")).unwrap();
    for what in [
        "log.level info -> debug",
        "delivery.max_requests_per_second none -> 5",
        "ingest.token (changed)",
    ] {
        assert!(reloaded.contains(what), "{reloaded}");
    }
    // What cannot change live is named, every key of it: the listen address, and keys read
    // once at start (the backoff ceiling, the queue's bound).
    let restart = log_text
        .lines()
        .find(|l| l.contains("only after a restart"))
        .unwrap_or_else(|| panic!("no restart line: {log_text}"));
    for what in [
        "ingest.listen",
        "delivery.backoff_max_ms",
        "queue.max_records",
    ] {
        assert!(restart.contains(what), "{restart}");
    }
    assert!(!restart.contains("log.level"), "{restart}");
    assert!(!log_text.contains(new_token), "a secret was logged");
    // The datagrams may land a moment after the log line.
    let said = |heard: &Heard| -> Vec<String> {
        heard.lock().unwrap()[before..]
            .iter()
            .map(|(_, m)| m.clone())
            .collect()
    };
    let told = wait_until(Duration::from_secs(5), || {
        let said = said(&heard);
        said.iter().any(|m| m.contains("RELOADING=1")) && said.iter().any(|m| m.contains("READY=1"))
    })
    .await;
    assert!(told, "{:?}", said(&heard));

    assert_eq!(send(TOKEN, 2).await, 401, "the old token still works");
    assert_eq!(send(new_token, 3).await, 202);

    // A broken file changes nothing.
    std::fs::write(&config, "this is = = not toml").unwrap();
    sighup(&child);
    assert!(
        wait_until(Duration::from_secs(10), || read_log()
            .contains("reload refused"))
        .await,
        "{}",
        read_log()
    );
    assert_eq!(send(new_token, 4).await, 202);

    let fake2 = fake.clone();
    assert!(wait_until(Duration::from_secs(10), || fake2.events().len() == 3).await);
    let mut ids: Vec<u64> = fake
        .events()
        .iter()
        .filter_map(|e| e["properties"]["id"].as_u64())
        .collect();
    ids.sort();
    assert_eq!(
        ids,
        vec![1, 3, 4],
        "only the requests with a valid token were taken"
    );
    assert_eq!(sigterm(&mut child), 0, "{}", read_log());
}

/// A reload is judged against the address the daemon is bound to: bound on every address
/// with a token, a file that now says loopback and no token must not open the public socket
/// to anyone (the listen address itself changes only at a restart).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_never_drops_the_token_while_the_socket_is_public() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeBraze::start(API_KEY).await.unwrap();
    let port = free_port();
    let config = dir.path().join("config.toml");
    // Off loopback a token must be at least 32 characters.
    let long_token = "a-token-long-enough-for-a-public-socket";
    let public = config_text(dir.path(), &fake, port, "")
        .replace(&format!("127.0.0.1:{port}"), &format!("0.0.0.0:{port}"))
        .replace(TOKEN, long_token);
    std::fs::write(&config, public).unwrap();
    let (socket, heard) = notify_socket(dir.path());
    let log = dir.path().join("daemon.log");
    let mut child = spawn(
        &config,
        &log,
        &[("NOTIFY_SOCKET", socket.to_str().unwrap().to_string())],
    );
    let read_log = || std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        wait_for(&heard, Duration::from_secs(20), |m| m.contains("READY=1")).await,
        "{}",
        read_log()
    );
    let stats = format!("http://127.0.0.1:{port}/v1/admin/queue/stats");
    let anonymous = || async { http().get(&stats).send().await.unwrap().status().as_u16() };
    assert_eq!(anonymous().await, 401);

    let loopback_without_token =
        config_text(dir.path(), &fake, port, "").replace(&format!("token = {TOKEN:?}\n"), "");
    assert!(!loopback_without_token.contains("token"));
    std::fs::write(&config, loopback_without_token).unwrap();
    sighup(&child);
    assert!(
        wait_until(Duration::from_secs(10), || read_log()
            .contains("ingest.token kept"))
        .await,
        "{}",
        read_log()
    );
    assert_eq!(
        anonymous().await,
        401,
        "the token was dropped on a public socket"
    );
    let with_token = http()
        .get(&stats)
        .bearer_auth(long_token)
        .send()
        .await
        .unwrap();
    assert_eq!(with_token.status(), 200);
    assert_eq!(sigterm(&mut child), 0, "{}", read_log());
}
