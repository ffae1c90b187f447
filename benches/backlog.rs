//! A large backlog, run by hand:
//!
//! ```sh
//! cargo bench --bench backlog                                   # 10 M pending, 10 M churn
//! cargo bench --bench backlog -- --records 1000000 --churn 1000000 --live 50000
//! ```
//!
//! The real binary, as a separate process, on a real sled queue in a temporary directory:
//!
//! 1. `import events` puts `--records` NDJSON events (about 130 bytes each) in the queue with
//!    the daemon stopped; disk bytes per record are read from the data directory.
//! 2. The daemon is started with Braze unreachable (nothing drains), then SIGKILLed and
//!    started again, three times: time from spawn to `/healthz` answering, and RSS at ready
//!    and 3 s later.
//! 3. A counting stand-in for Braze (`/users/track`, 201 for everything) comes up on the
//!    endpoint's port; the daemon drains the backlog. Disk is sampled every second.
//! 4. `--churn` more events are posted over HTTP (1,000 per request, 2 clients) while at most
//!    `--live` are pending: the backlog stays small while ten million records pass through.
//!    Disk must stay bounded: at most 3× the largest live backlog (step 1's size).
//!
//! The stand-in only counts: it keeps no records, so its memory does not grow with the run.
//!
//! With `--snapshot N` it measures snapshot diffing instead: a split of N
//! members is imported (`import snapshot`, daemon stopped) and delivered, then a second
//! snapshot with 1 % churn (N/200 gone, N/200 new); time, peak RSS and the Braze requests
//! each one cost are counted at the stand-in.
//!
//! ```sh
//! cargo bench --bench backlog -- --snapshot 10000000
//! ```

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use aiq_braze_sync::queue::dir_bytes;

const KEY: &str = "bench-key";

struct Args {
    records: u64,
    churn: u64,
    live: u64,
    snapshot: u64,
}

fn args() -> Args {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let value = |name: &str, default: u64| {
        argv.iter()
            .position(|x| x == name)
            .and_then(|i| argv.get(i + 1))
            .map_or(default, |v| {
                v.parse()
                    .unwrap_or_else(|_| panic!("{name} takes a number"))
            })
    };
    Args {
        records: value("--records", 10_000_000),
        churn: value("--churn", 10_000_000),
        live: value("--live", 100_000),
        snapshot: value("--snapshot", 0),
    }
}

fn event_line(i: u64) -> String {
    format!(
        "{{\"name\":\"purchase\",\"external_id\":\"user-{}\",\"time\":\"2026-11-28T10:00:00Z\",\"properties\":{{\"id\":{i},\"sku\":\"A-{}\"}}}}\n",
        i % 1_000_003,
        i % 977
    )
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Resident and peak resident memory of a process, in MB, from `/proc`.
fn rss_mb(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .map_or(0, |kb| kb / 1024)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

struct Daemon {
    child: Child,
}

/// A run that fails half-way must not leave its daemon running.
impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Daemon {
    /// Spawns the daemon and waits for `/healthz`; returns it and how long that took.
    async fn start(bin: &Path, config: &Path, port: u16, log: &Path) -> (Daemon, Duration) {
        let started = Instant::now();
        let child = Command::new(bin)
            .args(["--config", config.to_str().unwrap(), "run"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).unwrap())
            .spawn()
            .unwrap();
        let client = reqwest::Client::new();
        let url = format!("http://127.0.0.1:{port}/healthz");
        loop {
            if client
                .get(&url)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(120),
                "daemon not ready"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        (Daemon { child }, started.elapsed())
    }

    fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    fn stop(mut self) {
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        self.child.wait().unwrap();
    }
}

/// A Braze stand-in that answers every `/users/track` with 201 and counts the objects, and
/// the requests in `requests` when given.
async fn counting_braze(port: u16, received: Arc<AtomicU64>) {
    counting_braze_requests(port, received, Arc::default()).await
}

async fn counting_braze_requests(port: u16, received: Arc<AtomicU64>, requests: Arc<AtomicU64>) {
    use axum::routing::post;
    #[derive(serde::Deserialize)]
    struct Body {
        #[serde(default)]
        events: Vec<serde::de::IgnoredAny>,
        #[serde(default)]
        attributes: Vec<serde::de::IgnoredAny>,
    }
    let app = axum::Router::new().route(
        "/users/track",
        post(move |body: axum::body::Bytes| {
            let (received, requests) = (received.clone(), requests.clone());
            async move {
                requests.fetch_add(1, Ordering::Relaxed);
                let n = serde_json::from_slice::<Body>(&body)
                    .map(|b| b.events.len() + b.attributes.len())
                    .unwrap_or(0);
                received.fetch_add(n as u64, Ordering::Relaxed);
                (
                    axum::http::StatusCode::CREATED,
                    [("content-type", "application/json")],
                    "{\"message\":\"success\"}",
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .unwrap();
    axum::serve(listener, app).await.unwrap();
}

/// A temporary directory holding the data directory and a config for the real binary, which
/// expects Braze at `braze_port` (nothing listens there until a stand-in is started).
struct Run {
    bin: PathBuf,
    dir: tempfile::TempDir,
    data: PathBuf,
    port: u16,
    braze_port: u16,
    config: PathBuf,
    log: PathBuf,
}

/// `more` is appended to the config: the sections after `[ingest]`.
fn prepare(more: &str) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let (port, braze_port) = (free_port(), free_port());
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "data_dir = {data:?}\n[braze]\nendpoint = \"http://127.0.0.1:{braze_port}\"\napi_key = {KEY:?}\n\
             [ingest]\nlisten = \"127.0.0.1:{port}\"\n{more}"
        ),
    )
    .unwrap();
    Run {
        // A wrapper (perf record, a stat tool) may stand in for the binary when profiling.
        bin: std::env::var_os("AIQ_BENCH_BIN").map_or_else(
            || PathBuf::from(env!("CARGO_BIN_EXE_aiq-braze-sync")),
            PathBuf::from,
        ),
        log: dir.path().join("daemon.log"),
        dir,
        data,
        port,
        braze_port,
        config,
    }
}

/// Starts the daemon on what is queued three times, SIGKILLing it 3 s after it is ready:
/// time to ready and RSS each time.
async fn starts_and_kills(bin: &Path, config: &Path, port: u16, log: &Path) {
    for round in 1..=3 {
        let (d, ready) = Daemon::start(bin, config, port, log).await;
        let at_ready = rss_mb(d.child.id()).0;
        tokio::time::sleep(Duration::from_secs(3)).await;
        let (later, peak) = rss_mb(d.child.id());
        println!(
            "start {round}: ready in {:.2} s, RSS {at_ready} MB at ready, {later} MB 3 s later (peak {peak} MB)",
            ready.as_secs_f64()
        );
        d.kill();
    }
}

/// A client for the daemon's admin socket in `data`: the admin API needs no token there.
fn admin_client(data: &Path) -> reqwest::Client {
    reqwest::Client::builder()
        .unix_socket(data.join("admin.sock"))
        .build()
        .unwrap()
}

async fn stats(admin: &reqwest::Client) -> serde_json::Value {
    match admin
        .get("http://localhost/v1/admin/queue/stats")
        .send()
        .await
    {
        Ok(r) => r.json().await.unwrap_or_default(),
        Err(_) => serde_json::Value::Null,
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = args();
    let _ = rustls::crypto::ring::default_provider().install_default();
    if args.snapshot > 0 {
        return snapshot(args.snapshot).await;
    }
    let Run {
        bin,
        dir,
        data,
        port,
        braze_port,
        config,
        log,
    } = prepare(&format!(
        "[delivery]\nbackoff_initial_ms = 200\nbackoff_max_ms = 1000\n[queue]\nmax_records = {}\n",
        args.records + args.live + 100_000
    ));
    println!(
        "backlog bench: {} pending, then {} churned through at most {} live; data in {}",
        args.records,
        args.churn,
        args.live,
        data.display()
    );

    // 1. Fill.
    let file = dir.path().join("events.ndjson");
    {
        let mut w = std::io::BufWriter::new(std::fs::File::create(&file).unwrap());
        for i in 0..args.records {
            w.write_all(event_line(i).as_bytes()).unwrap();
        }
    }
    let started = Instant::now();
    let mut import = Command::new(&bin)
        .args(["--config", config.to_str().unwrap(), "import", "events"])
        .arg(&file)
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut import_peak = 0;
    while import.try_wait().unwrap().is_none() {
        import_peak = import_peak.max(rss_mb(import.id()).1);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let took = started.elapsed().as_secs_f64();
    std::fs::remove_file(&file).unwrap();
    let backlog_bytes = dir_bytes(&data);
    println!(
        "import: {} records in {took:.1} s ({:.0} records/s), peak RSS {import_peak} MB",
        args.records,
        args.records as f64 / took
    );
    println!(
        "disk: {backlog_bytes} bytes, {:.0} bytes per record",
        backlog_bytes as f64 / args.records as f64
    );

    // 2. Ready after SIGKILL, Braze unreachable.
    starts_and_kills(&bin, &config, port, &log).await;

    // 3. Drain into the counting stand-in.
    let received = Arc::new(AtomicU64::new(0));
    tokio::spawn(counting_braze(braze_port, received.clone()));
    let (d, _) = Daemon::start(&bin, &config, port, &log).await;
    let pid = d.child.id();
    let admin = admin_client(&data);
    let started = Instant::now();
    let mut peak_disk = backlog_bytes;
    let mut peak_rss = 0;
    while received.load(Ordering::Relaxed) < args.records {
        tokio::time::sleep(Duration::from_secs(1)).await;
        peak_disk = peak_disk.max(dir_bytes(&data));
        peak_rss = peak_rss.max(rss_mb(pid).0);
    }
    let took = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after_drain = dir_bytes(&data);
    println!(
        "drain: {} records in {took:.1} s ({:.0} records/s end to end), peak disk {peak_disk} bytes, peak RSS {peak_rss} MB, disk 3 s after: {after_drain} bytes",
        args.records,
        args.records as f64 / took
    );

    // 4. Churn through a small live set.
    let posted = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let writers: Vec<_> = (0..2u64)
        .map(|w| {
            let (posted, live, churn) = (posted.clone(), args.live, args.churn);
            let admin = admin_client(&data);
            tokio::spawn(async move {
                let client = reqwest::Client::new();
                let mut i = w * 1000;
                while i < churn {
                    let end = (i + 1000).min(churn);
                    let body: String = (i..end).map(|n| event_line(args_base() + n)).collect();
                    loop {
                        let pending = stats(&admin).await["queue"]["pending"]
                            .as_u64()
                            .unwrap_or(u64::MAX / 2);
                        if pending + 1000 > live {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            continue;
                        }
                        let r = client
                            .post(format!("http://127.0.0.1:{port}/v1/events"))
                            .header("content-type", "application/x-ndjson")
                            .body(body.clone())
                            .send()
                            .await;
                        if r.is_ok_and(|r| r.status().as_u16() == 202) {
                            break;
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    posted.fetch_add(end - i, Ordering::Relaxed);
                    i += 2000;
                }
            })
        })
        .collect();
    let (mut peak_disk, mut peak_live, mut peak_rss) = (0u64, 0u64, 0u64);
    let mut compactions = 0;
    while !done.load(Ordering::Relaxed) {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let s = stats(&admin).await;
        peak_live = peak_live.max(s["queue"]["pending"].as_u64().unwrap_or(0));
        compactions = s["queue"]["compactions_total"].as_u64().unwrap_or(0);
        peak_disk = peak_disk.max(dir_bytes(&data));
        peak_rss = peak_rss.max(rss_mb(pid).0);
        if received.load(Ordering::Relaxed) >= args.records + args.churn {
            done.store(true, Ordering::Relaxed);
        }
    }
    for w in writers {
        w.await.unwrap();
    }
    let took = started.elapsed().as_secs_f64();
    println!(
        "churn: {} records in {took:.1} s ({:.0} records/s), at most {peak_live} pending; peak disk {peak_disk} bytes = {:.2}x the full backlog's; peak RSS {peak_rss} MB; {compactions} rebuilds; disk at the end {} bytes",
        args.churn,
        args.churn as f64 / took,
        peak_disk as f64 / backlog_bytes as f64,
        dir_bytes(&data)
    );
    d.stop();
}

/// Churned events get ids after the backlog's, so none repeats.
fn args_base() -> u64 {
    1 << 40
}

/// Runs a command to its end; returns its wall time in seconds and peak RSS in MB.
async fn timed(command: &mut Command) -> (f64, u64) {
    let started = Instant::now();
    let mut child = command.stdout(Stdio::null()).spawn().unwrap();
    let mut peak = 0;
    while child.try_wait().unwrap().is_none() {
        peak = peak.max(rss_mb(child.id()).1);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(child.wait().unwrap().success(), "{command:?} failed");
    (started.elapsed().as_secs_f64(), peak)
}

/// `--snapshot N`: snapshot diffing at scale (see the module doc).
async fn snapshot(members: u64) {
    let Run {
        bin,
        dir,
        data,
        port,
        braze_port,
        config,
        log,
    } = prepare(&format!("[queue]\nmax_records = {}\n", members + 1_000_000));
    let churn = members / 200;
    let (first, second) = (dir.path().join("a.ndjson"), dir.path().join("b.ndjson"));
    {
        let mut a = std::io::BufWriter::new(std::fs::File::create(&first).unwrap());
        let mut b = std::io::BufWriter::new(std::fs::File::create(&second).unwrap());
        for i in 0..members {
            let line = format!("{{\"external_id\":\"c-{i}\"}}\n");
            a.write_all(line.as_bytes()).unwrap();
            if i >= churn {
                b.write_all(line.as_bytes()).unwrap();
            }
        }
        for i in 0..churn {
            b.write_all(format!("{{\"external_id\":\"n-{i}\"}}\n").as_bytes())
                .unwrap();
        }
    }
    println!(
        "snapshot bench: {members} members, then 1 % churn ({churn} gone, {churn} new); data in {}",
        data.display()
    );
    let (received, requests) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut expected = 0;
    for (name, file, changes) in [
        ("first upload", &first, members),
        ("1 % churn", &second, 2 * churn),
    ] {
        let (took, peak) = timed(
            Command::new(&bin)
                .args(["--config", config.to_str().unwrap()])
                .args(["import", "snapshot", "--audience", "9", "--split", "1"])
                .arg(file),
        )
        .await;
        if expected == 0 {
            // The whole split pending as memberships (the backlog as state
            // rather than events): disk, then start and SIGKILL with Braze not there yet.
            let bytes = dir_bytes(&data);
            println!(
                "{members} memberships pending: {bytes} bytes on disk, {:.0} bytes per membership",
                bytes as f64 / members as f64
            );
            starts_and_kills(&bin, &config, port, &log).await;
            tokio::spawn(counting_braze_requests(
                braze_port,
                received.clone(),
                requests.clone(),
            ));
        }
        let before = requests.load(Ordering::Relaxed);
        expected += changes;
        let (d, _) = Daemon::start(&bin, &config, port, &log).await;
        let started = Instant::now();
        while received.load(Ordering::Relaxed) < expected {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let drained = started.elapsed().as_secs_f64();
        // The daemon rebuilds its database once a backlog has drained and left a file of at
        // least `queue.compact_min_mb` (256 MB). Stopping before that would leave the next
        // import to open the whole drained file (about 1 GB of RSS after 10 M), which no
        // running daemon keeps for more than a few seconds.
        let admin = admin_client(&data);
        let waited = Instant::now();
        let rebuilt = loop {
            let q = &stats(&admin).await["queue"];
            let bytes = q["disk_bytes"].as_u64().unwrap_or(u64::MAX);
            if bytes < 256 << 20 {
                break format!("{} MB on disk", bytes >> 20);
            }
            if waited.elapsed() > Duration::from_secs(120) {
                break "no rebuild within 120 s".to_string();
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let rebuilt = format!("{rebuilt} {:.1} s later", waited.elapsed().as_secs_f64());
        d.stop();
        println!(
            "{name}: diffed and queued in {took:.1} s, peak RSS {peak} MB; {changes} changes delivered in {drained:.1} s with {} Braze requests; {rebuilt}",
            requests.load(Ordering::Relaxed) - before
        );
    }
}
